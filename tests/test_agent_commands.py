"""Agent commands, with the agent running in the test's own event loop (so its clock can be
injected) against a real mosquitto: the NTP-style time exchange, reload, storage."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hardware.virtual_modem import VirtualModem
from probe_agent.agent import Agent
from probe_agent.clock import Clock, ntp_offset
from probe_agent.config import load
from tests.mosquitto import Mosquitto, connected_client

P = "pf/v1/agents/pi-uk-1"


def write_config(path: Path, broker: Mosquitto, modems: list[tuple[str, str]]) -> Path:
    blocks = "".join(f'\n[[modems]]\nid = "{m}"\nport = "{p}"\npoll_interval_s = 0.5\n' for m, p in modems)
    path.write_text(
        f'agent_id = "pi-uk-1"\nheartbeat_interval_s = 1\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'[spool]\npath = "{path.with_suffix(".db")}"\n[clock]\nchronyc = ""\n{blocks}'
    )
    return path


class Controller:
    """The controller's side of the command exchange, on paho."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = connected_client(broker)
        self.responses: dict[str, tuple[dict[str, Any], datetime]] = {}
        self._cond = threading.Condition()
        self.client.on_message = self._on_message
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(f"{P}/response/+", qos=1)
        assert done.wait(5)

    def _on_message(self, client: object, userdata: object, message: Any) -> None:
        t4 = datetime.now(UTC)
        body = json.loads(message.payload)
        with self._cond:
            self.responses[body["transaction"]] = (body, t4)
            self._cond.notify_all()

    def ask(self, command: str, data: dict[str, Any], transaction: str) -> tuple[dict[str, Any], datetime]:
        payload = json.dumps({"transaction": transaction, "data": data}).encode()
        self.client.publish(f"{P}/request/{command}", payload, qos=1)
        deadline = time.monotonic() + 20
        with self._cond:
            while transaction not in self.responses:
                assert time.monotonic() < deadline, f"no response to {command}"
                self._cond.wait(0.1)
            return self.responses[transaction]

    def time_exchange(self, transaction: str, **extra: float) -> tuple[float, float]:
        t1 = datetime.now(UTC)
        body, t4 = self.ask("time", {"t1": t1.isoformat(), **extra}, transaction)
        assert body["status"] == "ok", body
        data = body["data"]
        t2, t3 = datetime.fromisoformat(data["t2"]), datetime.fromisoformat(data["t3"])
        assert datetime.fromisoformat(data["t1"]) == t1
        return ntp_offset(t1, t2, t3, t4)


@pytest.fixture
async def run_agent() -> AsyncIterator[Callable[..., Agent]]:
    running: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []

    def start(config_path: Path, clock: Clock | None = None) -> Agent:
        agent = Agent(load(config_path), config_path=config_path, clock=clock)
        stop = asyncio.Event()
        running.append((agent, stop, asyncio.create_task(agent.run(stop))))
        return agent

    yield start
    for _, stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("shift_ms", [0.0, 250.0, -3040.0])
async def test_time_exchange_measures_the_agents_clock_offset(
    tmp_path: Path, mosquitto: Mosquitto, run_agent: Callable[..., Agent], shift_ms: float
) -> None:
    clock = Clock(now=lambda: datetime.now(UTC) + timedelta(milliseconds=shift_ms), chronyc=None)
    agent = run_agent(write_config(tmp_path / "agent.toml", mosquitto, []), clock=clock)
    await asyncio.wait_for(agent.uplink.connected.wait(), 10)
    controller = Controller(mosquitto)
    results = [await asyncio.to_thread(controller.time_exchange, f"t-{i}") for i in range(5)]
    best_offset, best_rtt = min(results, key=lambda r: r[1])  # the fastest exchange bounds it best
    assert abs(best_offset - shift_ms) <= max(5.0, best_rtt / 2), results
    # The controller tells the agent what it measured; observations then carry it.
    await asyncio.to_thread(controller.time_exchange, "t-tell", offset_ms=best_offset, error_ms=best_rtt / 2)
    state = agent.clock.state()
    assert state.source == "controller" and state.offset_ms == pytest.approx(best_offset)
    assert state.since_sync_s is not None and state.since_sync_s < 5


async def test_reload_adds_and_removes_modems_and_refuses_a_bad_config(
    tmp_path: Path,
    mosquitto: Mosquitto,
    run_agent: Callable[..., Agent],
    make_modem: Callable[..., VirtualModem],
) -> None:
    a, b = make_modem(), make_modem()
    path = write_config(tmp_path / "agent.toml", mosquitto, [("modem-a", a.port)])
    agent = run_agent(path)
    await asyncio.wait_for(agent.uplink.connected.wait(), 10)
    controller = Controller(mosquitto)
    write_config(path, mosquitto, [("modem-b", b.port)])
    body, _ = await asyncio.to_thread(controller.ask, "reload", {}, "r-1")
    assert body["status"] == "ok" and body["data"] == {
        "added": ["modem-b"],
        "removed": ["modem-a"],
        "restarted": [],
    }
    assert list(agent.modems) == ["modem-b"]
    path.write_text(path.read_text().replace("poll_interval_s = 0.5", "poll_interval_s = -1"))
    body, _ = await asyncio.to_thread(controller.ask, "reload", {}, "r-2")
    assert body["status"] == "error" and "modems.0.poll_interval_s" in body["error"]
    assert list(agent.modems) == ["modem-b"], "a bad config changes nothing"
    write_config(path, mosquitto, [("modem-b", b.port)])
    path.write_text(path.read_text().replace('agent_id = "pi-uk-1"', 'agent_id = "pi-uk-2"'))
    body, _ = await asyncio.to_thread(controller.ask, "reload", {}, "r-3")
    assert body["status"] == "error" and "agent_id" in body["error"] and "restart" in body["error"]
    body, _ = await asyncio.to_thread(controller.ask, "storage", {"modem": "modem-x"}, "r-4")
    assert body["status"] == "error" and "unknown modem 'modem-x'" in body["error"]
