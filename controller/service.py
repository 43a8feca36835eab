"""The controller service process: database, MQTT link and ingest, until stopped.

Scheduling, correlation, scoring, the routing table and the web API join this as they land.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime

from controller.clock_sync import ClockSync
from controller.config import ControllerConfig
from controller.ingest import Ingest
from controller.mqtt import ControllerLink
from controller.storage.db import open_database
from probe_agent.protocol import Topics

log = logging.getLogger(__name__)


async def _sweep(ingest: Ingest, interval_s: float) -> None:
    """Decide overdue test cases every ``interval_s``; a failed sweep is retried next time."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ingest.sweep(datetime.now(UTC))
        except Exception:
            log.exception("deadline sweep failed; retrying in %.0f s", interval_s)


async def serve(config: ControllerConfig, stop: asyncio.Event) -> None:
    """Run the controller until ``stop`` is set; every observation taken is written first."""
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
    tasks = [
        asyncio.create_task(link.run(), name="mqtt"),
        asyncio.create_task(clock.run(), name="clock sync"),
        asyncio.create_task(_sweep(ingest, config.correlation.sweep_interval_s), name="deadline sweep"),
    ]
    log.info("controller serving (session %s)", link.session)
    try:
        await stop.wait()
    finally:
        await link.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ingest.close()
        await engine.dispose()
        log.info("controller stopped")
