"""The controller's side of the NTP-style time exchange with each agent.

Every few minutes each online agent gets a ``time`` request carrying t1 (and the offset measured
last time, which the agent then reports in its observations); its response brings t2 and t3,
the arrival of the response is t4. The offset (agent clock minus controller clock) and its
error bound (half the round trip) are stored with the agent and used to correct latencies.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.mqtt import ControllerLink
from controller.storage import schema as s
from probe_agent.clock import ntp_offset
from probe_agent.protocol import CommandRequest, CommandResponse, TimeResponseData, Topics

log = logging.getLogger(__name__)

#: A response later than this is too slow to bound the offset usefully; it is ignored.
RESPONSE_TIMEOUT_S = 10.0


class ClockSync:
    """Sends time requests and turns the responses into stored offsets."""

    def __init__(self, engine: AsyncEngine, link: ControllerLink, topics: Topics, interval_s: float) -> None:
        self.engine = engine
        self.link = link
        self.topics = topics
        self.interval_s = interval_s
        self._sent: dict[str, tuple[str, datetime]] = {}
        self._last: dict[str, tuple[float, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Measure every online agent, then again every ``interval_s``."""
        while True:
            await self.link.connected.wait()
            async with self.engine.connect() as conn:
                agents = [
                    r.id
                    for r in await conn.execute(select(s.agents.c.id).where(s.agents.c.state == "online"))
                ]
            for agent in agents:
                await self.request(agent)
            await asyncio.sleep(self.interval_s)

    async def request(self, agent: str) -> None:
        """Send one time request to ``agent``."""
        transaction = uuid.uuid4().hex
        t1 = datetime.now(UTC)
        data: dict[str, object] = {"t1": t1.isoformat()}
        if agent in self._last:
            data["offset_ms"], data["error_ms"] = self._last[agent]
        self._sent[transaction] = (agent, t1)
        loop = asyncio.get_running_loop()
        loop.call_later(RESPONSE_TIMEOUT_S, self._sent.pop, transaction, None)
        payload = CommandRequest(transaction=transaction, data=data).to_json()
        await self.link.publish(self.topics.request(agent, "time"), payload, qos=1)

    def on_response(self, agent: str, command: str, response: CommandResponse, received_at: datetime) -> None:
        """Ingest hands every command response here; time responses are matched and stored."""
        if command != "time" or response.transaction not in self._sent:
            return
        sent_agent, t1 = self._sent.pop(response.transaction)
        if sent_agent != agent or response.status != "ok" or response.data is None:
            log.warning("time exchange with %s failed: %s", agent, response.error, extra={"agent": agent})
            return
        data = TimeResponseData.model_validate(response.data)
        offset_ms, round_trip_ms = ntp_offset(t1, data.t2, data.t3, received_at)
        self._last[agent] = (offset_ms, round_trip_ms / 2)
        log.info(
            "agent %s clock offset %.1f ms ± %.1f ms",
            agent,
            offset_ms,
            round_trip_ms / 2,
            extra={"agent": agent},
        )
        task = asyncio.get_running_loop().create_task(
            self._store(agent, offset_ms, round_trip_ms / 2, received_at)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store(self, agent: str, offset_ms: float, error_ms: float, at: datetime) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(s.agents)
                .where(s.agents.c.id == agent)
                .values(clock_offset_ms=offset_ms, clock_error_ms=error_ms, clock_measured_at=at)
            )
