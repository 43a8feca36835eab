"""The controller service process, until stopped: the database, the MQTT link with ingest and
correlation, the deadline sweep, clock sync, the scheduler, score recomputes with the routing
table published on change, and the REST API.

Several instances may run on one database (``[leader]``). Every instance ingests (an MQTT shared
subscription splits the observations), dispatches due tests (each claimed once), serves the API,
runs its sender and loads the newest routing table into it. Only the leader (``controller.leader``)
runs what must happen once: the campaign rounds, the deadline sweep, the score recompute with the
routing table's rebuild and publish, and the clock sync with the agents (every instance would
otherwise send every agent its own time requests and overwrite the others' stored offsets).
Every instance keeps a heartbeat (``controller.instances``): the leader's deadline sweep fails the
submits an instance that died left in flight, once its heartbeat has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from controller import routing
from controller.api.app import serving
from controller.clock_sync import ClockSync
from controller.config import ControllerConfig
from controller.ingest import Ingest
from controller.instances import Heartbeat
from controller.leader import Leader
from controller.mqtt import ControllerLink
from controller.recovery import recover_orphaned
from controller.schedule import Scheduler
from controller.sender.rules import load_rules
from controller.sender.sender import Sender
from controller.storage.db import open_database
from controller.submit import NoSender, Submitter
from probe_agent.protocol import RoutingTable, Topics

log = logging.getLogger(__name__)


async def _sweep(ingest: Ingest, heartbeat: Heartbeat, interval_s: float) -> None:
    """Decide overdue test cases, and fail the submits of instances that are gone, every
    ``interval_s``; a failed sweep is retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        now = datetime.now(UTC)
        try:
            await ingest.sweep(now)
        except Exception:
            log.exception("deadline sweep failed; retrying in %.0f s", interval_s)
        try:
            await recover_orphaned(ingest.engine, heartbeat, now)
        except Exception:
            log.exception(
                "recovering the submits of stopped instances failed; retrying in %.0f s", interval_s
            )


async def _routing(
    engine: AsyncEngine,
    config: ControllerConfig,
    link: ControllerLink,
    topics: Topics,
    sender: Sender | None = None,
) -> None:
    """Recompute the scores and rebuild the routing table every interval; publish the current
    version (retained) until the broker has it, so a table built while the broker was away goes
    out once it is back. A failed rebuild is logged and retried at the next interval."""
    loop = asyncio.get_running_loop()
    interval_s = config.routing.rebuild_interval_s
    table: RoutingTable | None = None
    published: int | None = None
    next_rebuild = loop.time()
    while True:
        if loop.time() >= next_rebuild:
            next_rebuild = loop.time() + interval_s
            try:
                table, _ = await routing.rebuild(engine, config.scoring, config.routing, datetime.now(UTC))
                if sender is not None:
                    sender.use_table(table)
            except Exception:
                log.exception("rebuilding the routing table failed; retrying in %.0f s", interval_s)
        if table is not None and table.version != published:
            payload = routing.table_json(table).encode()
            if await link.publish(topics.routing_table(), payload, qos=1, retain=True):
                published = table.version
                log.info("routing table version %d published", table.version)
        waiting = table is not None and table.version != published
        await asyncio.sleep(1.0 if waiting else max(0.0, next_rebuild - loop.time()))


async def _use_latest_table(engine: AsyncEngine, sender: Sender, leader: Leader, interval_s: float) -> None:
    """While following, route by the newest stored routing table, read every ``interval_s``: the
    leader builds it (and hands it to its own sender at once), every instance's sender uses it."""
    while True:
        try:
            if not leader.is_leader:
                async with engine.connect() as conn:
                    table = await routing.latest(conn)
                if table is not None and not leader.is_leader:
                    sender.use_table(table)
        except Exception:
            log.exception("reading the routing table failed; retrying in %.0f s", interval_s)
        await asyncio.sleep(interval_s)


async def _sync_routes(sender: Sender, interval_s: float) -> None:
    """Bring the sender's connectors in line with the routes table every ``interval_s``."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sender.sync_routes()
        except Exception:
            log.exception("syncing the route connectors failed; retrying in %.0f s", interval_s)


async def serve(config: ControllerConfig, stop: asyncio.Event, submitter: Submitter | None = None) -> None:
    """Run the controller until ``stop`` is set; every observation taken is written first.

    ``submitter`` sends the scheduled tests; by default the bundled sender does (``[sender]``),
    and with the sender disabled they are planned and refused at submit, each with that reason.
    Raises ``DatabaseUnavailable`` or ``ApiStartError`` when it cannot start.
    """
    engine = await open_database(config.database_url)
    # Ingest keeps many short-lived objects in flight; the default collector thresholds made
    # full collections a third of its CPU (bench/ingest.py). Start-up objects are frozen out of it.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    topics = Topics(config.topic_prefix)
    ingest = Ingest(
        engine,
        topics,
        batch_max=config.ingest.batch_max,
        flush_interval_s=config.ingest.flush_interval_s,
        grace_ms=config.correlation.grace_s * 1000.0,
    )
    link = ControllerLink(config.broker, topics, ingest.handle)
    ingest.on_failure = link.reconnect
    clock = ClockSync(engine, link, topics, config.time_exchange_interval_s)
    ingest.on_response = clock.on_response
    leader = Leader(
        engine,
        ttl_s=config.leader.ttl_s,
        renew_interval_s=config.leader.renew_interval_s,
        max_clock_skew_s=config.leader.max_clock_skew_s,
    )
    # One name for this instance: its lease holder, its heartbeat and its claims of tests.
    heartbeat = Heartbeat(
        engine,
        leader.holder,
        ttl_s=config.leader.ttl_s,
        renew_interval_s=config.leader.renew_interval_s,
        max_clock_skew_s=config.leader.max_clock_skew_s,
    )
    log.info("controller instance %s", leader.holder)
    tasks: list[asyncio.Task[None]] = []
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(engine.dispose)
        sender: Sender | None = None
        if config.sender.enabled:
            sender = Sender(
                engine,
                rules=load_rules(config.sender.rules_file),
                prefix_file=config.sender.prefix_file,
                portability_file=config.sender.portability_file,
            )
            await sender.start()
            stack.push_async_callback(sender.stop)
            tasks += [
                asyncio.create_task(_sync_routes(sender, config.sender.sync_interval_s), name="routes"),
                asyncio.create_task(
                    _use_latest_table(engine, sender, leader, config.routing.rebuild_interval_s), name="table"
                ),
            ]
            submitter = submitter or sender
        if config.api.enabled:
            urls = await stack.enter_async_context(serving(engine, config, sender, leader=leader))
            log.info("REST API at %s", ", ".join(urls))
        # The singleton work: duties that run only while this instance leads.
        leader.add_duty("clock sync", clock.run)
        leader.add_duty(
            "deadline sweep", lambda: _sweep(ingest, heartbeat, config.correlation.sweep_interval_s)
        )
        leader.add_duty("routing table", lambda: _routing(engine, config, link, topics, sender))
        stack.push_async_callback(leader.stop)
        # Before any claim; removed only once the scheduler has stopped (the stack unwinds in reverse).
        await heartbeat.start()
        stack.push_async_callback(heartbeat.stop)
        await leader.start()
        if config.schedule.enabled:
            if submitter is None:
                log.warning("no sender connected: scheduled tests will be refused at submit")
            scheduler = Scheduler(
                engine,
                config.schedule,
                submitter or NoSender(),
                config.database_url,
                leader=leader,
                heartbeat=heartbeat,
            )
            await scheduler.start()
            stack.push_async_callback(scheduler.stop)
        tasks.append(asyncio.create_task(link.run(), name="mqtt"))
        log.info("controller serving (session %s)", link.session)
        try:
            await stop.wait()
        finally:
            # The singleton work stops first and the lease is released: another instance takes
            # over at once. Then write and acknowledge what was taken while still connected, and
            # disconnect: what arrives meanwhile stays unacknowledged and comes again after a restart.
            await leader.stop()
            await ingest.close()
            await link.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    log.info("controller stopped")
