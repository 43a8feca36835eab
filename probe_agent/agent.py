"""The probe agent: modems in, observations out through the durable spool, losing nothing.

One ``ModemRunner`` per configured modem turns each received SMS into an ``Observation``, writes it
to the spool (the SIM copy is deleted only after that write), and publishes the modem's state
when it changes. The ``Uplink`` drains the spool to the broker. Heartbeats publish health and
ping the systemd watchdog; commands from the controller arrive on ``request/{cmd}``.
A broken modem is reported and retried by its port while the others keep working.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from probe_agent import __version__, sdnotify
from probe_agent.clock import Clock, set_shift, utc_now
from probe_agent.commands import CommandError, Commands
from probe_agent.config import AgentConfig, ModemConfig
from probe_agent.logs import bind
from probe_agent.modem import ModemPort
from probe_agent.modem import ModemState as PortState
from probe_agent.protocol import (
    AgentStatus,
    ClockState,
    Health,
    ModemState,
    Observation,
    SimIdentity,
    Topics,
)
from probe_agent.received import ReceivedSms
from probe_agent.spool import Spool
from probe_agent.uplink import Uplink

log = logging.getLogger(__name__)

#: How often a modem's state is compared with what was last published.
STATE_CHECK_S = 1.0
#: Pause before a failed spool write is tried again (nothing is acknowledged to the SIM meanwhile).
SPOOL_RETRY_S = 1.0

PortFactory = Callable[[ModemConfig], ModemPort]


def _fit(value: str | None, limit: int) -> str | None:
    """A modem-reported identity within the contract's bound; an absurd one is dropped, logged."""
    if value is not None and len(value) > limit:
        log.warning("modem reported %r, longer than %d characters: not reported", value, limit)
        return None
    return value


def observation_id(agent: str, modem: str, pdus: tuple[str, ...]) -> str:
    """Stable id: the same SMS read again (after a crash, from storage) gets the same id."""
    digest = hashlib.sha256("|".join((agent, modem, *pdus)).encode()).hexdigest()
    return digest[:32]


def default_port(config: ModemConfig) -> ModemPort:
    """A real modem port for a configured modem."""
    return ModemPort(
        config.port,
        pin=config.secret_pin(),
        profile=config.profile,
        poll_interval_s=config.poll_interval_s,
        direct_delivery=config.direct_delivery,
    )


class ModemRunner:
    """One modem: its port, the consumer of its messages, its published state."""

    def __init__(self, agent: Agent, config: ModemConfig) -> None:
        self.agent = agent
        self.config = config
        self.port = agent.port_factory(config)
        self._tasks: list[asyncio.Task[None]] = []
        self._published: dict[str, Any] | None = None
        self.log = bind(log, agent=agent.config.agent_id, modem=config.id)

    async def start(self) -> None:
        await self.port.start()
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"consume {self.config.id}"),
            asyncio.create_task(self._watch_state(), name=f"state {self.config.id}"),
        ]

    async def stop(self) -> None:
        await self.port.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _consume(self) -> None:
        async for sms in self.port.received(auto_ack=False):
            state = await self.port.state()
            observation = self.agent.observation(self.config, sms, state)
            # The SIM copy goes once the spool writer has the observation on disk.
            await self.agent.writer.submit(observation, functools.partial(self.port.ack, sms))

    async def _watch_state(self) -> None:
        while True:
            await self.publish_state()
            await asyncio.sleep(STATE_CHECK_S)

    def state_payload(self, state: PortState) -> ModemState:
        return ModemState(
            agent=self.agent.config.agent_id,
            modem=self.config.id,
            port=self.config.port,
            profile=self.config.profile,
            connected=state.connected,
            registration=_fit(state.registration, 32),
            operator=state.operator,
            mcc_mnc=_fit(state.mcc_mnc, 6),
            expected_mcc_mnc=self.config.expected_mcc_mnc,
            imsi=_fit(state.imsi, 16),
            iccid=_fit(state.iccid, 22),
            msisdn=self.config.msisdn or _fit(state.msisdn, 16),
            signal_rssi=state.signal_rssi,
            signal_dbm=state.signal_dbm,
            storage_memory=state.storage_memory,
            storage_used=state.storage_used,
            storage_total=state.storage_total,
            last_error=state.last_error,
            last_error_at=state.last_error_at,
            reconnects=state.reconnects,
            events=list(state.events),
            updated_at=state.updated_at,
        )

    async def publish_state(self, force: bool = False) -> ModemState:
        """Publish the retained state when it changed (ignoring the update time)."""
        payload = self.state_payload(await self.port.state())
        comparable = payload.model_dump(exclude={"updated_at", "signal_rssi", "signal_dbm"})
        # Signal moves all the time: publish it on a change of 3 dB or more, not every wobble.
        signal = payload.signal_dbm
        last = self._published
        if (
            force
            or last is None
            or {k: v for k, v in comparable.items()} != last["state"]
            or (signal is None) != (last["signal"] is None)
            or (signal is not None and abs(signal - last["signal"]) >= 3)
        ):
            self._published = {"state": comparable, "signal": signal}
            await self.agent.uplink.publish_retained(
                self.agent.topics.modem_state(self.agent.config.agent_id, self.config.id), payload
            )
        return payload


class SpoolWriter:
    """Writes observations from every modem to the spool in batches: one transaction (one fsync)
    for whatever arrived meanwhile, then each SMS is acknowledged to its port."""

    def __init__(self, agent: Agent, batch_max: int = 200) -> None:
        self.agent = agent
        self.batch_max = batch_max
        self._queue: asyncio.Queue[tuple[Observation, Callable[[], None]]] = asyncio.Queue()

    async def submit(self, observation: Observation, on_durable: Callable[[], None]) -> None:
        await self._queue.put((observation, on_durable))

    async def run(self) -> None:
        topic = self.agent.topics.sms(self.agent.config.agent_id)
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            entries = [(obs.id, topic, obs.to_json()) for obs, _ in batch]
            while True:
                try:
                    stored = await asyncio.to_thread(self.agent.spool.put_many, entries)
                    break
                except Exception as exc:  # disk full, I/O error: the SIM copies stay until it works
                    log.error("spool write failed (%s); retrying in %.0f s", exc, SPOOL_RETRY_S)
                    await asyncio.sleep(SPOOL_RETRY_S)
            for (obs, on_durable), new in zip(batch, stored, strict=True):
                log.info(
                    "SMS from %s spooled%s",
                    obs.sender,
                    "" if new else " (already spooled or sent: a re-read)",
                    extra={"agent": obs.agent, "modem": obs.modem, "observation": obs.id},
                )
                on_durable()
            self.agent.uplink.wake()


class Agent:
    """The whole agent process; ``run()`` until the stop event is set."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        config_path: Path | None = None,
        clock: Clock | None = None,
        port_factory: PortFactory = default_port,
    ) -> None:
        self.config = config
        self.config_path = config_path
        set_shift(config.clock.shift_s)
        self.clock = clock or Clock(chronyc=config.clock.chronyc or None)
        self.port_factory = port_factory
        self.topics = Topics(config.topic_prefix)
        self.session = uuid.uuid4().hex
        self.started_at = utc_now()
        self._started_monotonic = time.monotonic()
        self.spool = Spool(config.spool.path, config.spool.max_entries)
        self.modems: dict[str, ModemRunner] = {}
        self.writer = SpoolWriter(self)
        self.commands = Commands(self)
        self.uplink = Uplink(
            config.broker,
            self.topics,
            config.agent_id,
            self.spool,
            status=self.status,
            on_command=self.commands.handle,
            now=self.clock.now,
            on_controller_online=self.republish,
        )
        self.log = bind(log, agent=config.agent_id)

    def status(self, state: str) -> AgentStatus:
        """The availability payload for ``state`` (online / offline / lost)."""
        return AgentStatus(
            state=state,
            agent=self.config.agent_id,
            session=self.session,
            version=__version__,
            started_at=self.started_at,
            at=None if state == "lost" else utc_now(),
            uptime_s=None if state == "lost" else round(time.monotonic() - self._started_monotonic, 3),
            dropped=self.spool.dropped(),
        )

    def observation(self, modem: ModemConfig, sms: ReceivedSms, state: PortState) -> Observation:
        """An observation from a received SMS, with the SIM and clock it was read with."""
        return Observation(
            id=observation_id(self.config.agent_id, modem.id, sms.pdus),
            agent=self.config.agent_id,
            modem=modem.id,
            sim=SimIdentity(
                imsi=_fit(state.imsi, 16),
                iccid=_fit(state.iccid, 22),
                msisdn=modem.msisdn or _fit(state.msisdn, 16),
                mcc_mnc=_fit(state.mcc_mnc, 6),
            ),
            sender=sms.sender,
            sender_type=sms.sender_type,
            sender_toa=sms.sender_toa,
            text=sms.text,
            smsc=sms.smsc,
            scts=sms.scts,
            urc_at=sms.arrived_at,
            completed_at=sms.completed_at,
            parts=sms.parts,
            total_parts=sms.total_parts,
            partial=sms.partial,
            missing_parts=list(sms.missing_parts),
            dcs=sms.dcs,
            alphabet=sms.alphabet,
            message_class=sms.message_class,
            flash=sms.flash,
            pid=sms.pid,
            silent=sms.silent,
            replace_type=sms.replace_type,
            concat_ref=sms.concat_ref,
            concat_ref_bits=sms.concat_ref_bits,
            origin=sms.origin.value,
            stored_before_start=sms.stored_before_start,
            pdus=list(sms.pdus),
            decode_error=sms.decode_error,
            notes=list(sms.notes),
            signal_dbm=state.signal_dbm,
            clock=self.clock.state(),
            software_version=__version__,
        )

    def health(self) -> Health:
        """Spool, uplink, clock and host figures for the heartbeat."""
        disk = shutil.disk_usage(self.config.spool.path.parent)
        return Health(
            agent=self.config.agent_id,
            at=utc_now(),
            spool_depth=self.spool.depth(),
            dropped=self.spool.dropped(),
            reconnects=self.uplink.reconnects,
            clock=self.clock.state(),
            load_1m=os.getloadavg()[0],
            memory_used_pct=psutil.virtual_memory().percent,
            rss_mb=round(psutil.Process().memory_info().rss / 1e6, 1),
            disk_free_mb=round(disk.free / 1e6, 1),
            modems_connected=sum(
                1 for r in self.modems.values() if r._published and r._published["state"]["connected"]
            ),
            modems_total=len(self.modems),
        )

    def clock_state(self) -> ClockState:
        return self.clock.state()

    async def add_modem(self, config: ModemConfig) -> ModemRunner:
        runner = ModemRunner(self, config)
        self.modems[config.id] = runner
        await runner.start()
        return runner

    async def remove_modem(self, modem_id: str) -> None:
        runner = self.modems.pop(modem_id)
        await runner.stop()

    async def republish(self) -> None:
        """The controller came (back) online: send every retained state again."""
        for runner in list(self.modems.values()):
            await runner.publish_state(force=True)
        await self.uplink.publish_retained(self.topics.health(self.config.agent_id), self.health(), qos=0)

    async def _heartbeat(self) -> None:
        reported_dropped = self.spool.dropped()
        while True:
            await asyncio.to_thread(self.clock.refresh)
            await self.uplink.publish_retained(self.topics.health(self.config.agent_id), self.health(), qos=0)
            dropped = self.spool.dropped()
            if dropped != reported_dropped:  # a full spool dropped observations: say so in the status
                self.log.warning("spool full: %d observation(s) dropped so far", dropped)
                await self.uplink.publish_status()
                reported_dropped = dropped
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def _watchdog(self, interval_s: float) -> None:
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(interval_s / 3)

    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, tell systemd we are ready, run until ``stop`` is set, stop cleanly."""
        self.log.info(
            "agent %s starting (version %s, session %s)", self.config.agent_id, __version__, self.session
        )
        uplink = asyncio.create_task(self.uplink.run(), name="uplink")
        writer = asyncio.create_task(self.writer.run(), name="spool writer")
        for modem in self.config.modems:
            await self.add_modem(modem)
        tasks = [asyncio.create_task(self._heartbeat(), name="heartbeat"), writer]
        watchdog_s = sdnotify.watchdog_interval_s()
        if watchdog_s:
            tasks.append(asyncio.create_task(self._watchdog(watchdog_s), name="watchdog"))
        sdnotify.ready()
        try:
            await stop.wait()
        finally:
            sdnotify.stopping()
            self.log.info("agent stopping")
            for modem_id in list(self.modems):
                await self.remove_modem(modem_id)
            await self.uplink.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            uplink.cancel()  # leaves the connection with a DISCONNECT: no will
            await asyncio.gather(uplink, return_exceptions=True)
            self.spool.close()


__all__ = ["Agent", "CommandError", "ModemRunner", "observation_id"]
