"""The controller's side of its MQTT worker (``controller.mqtt.ControllerLink``), on its own.

The worker process and the broker are exercised for real in tests/test_ingest.py; here the
socket to the worker is a stand-in that records what the link writes, because the case tried
needs exact timing no real worker gives on demand: a publish cancelled in the very loop turn its
answer arrives. It must end cancelled (Python 3.11's ``asyncio.wait_for`` would return the answer
instead, and a leader duty cancelled at step-down would then run on and never end).
"""

from __future__ import annotations

import asyncio
import pickle

import pytest

from controller.config import ControllerBrokerConfig
from controller.mqtt import ControllerLink
from probe_agent.protocol import Topics


class RecordingSocket:
    """What the link writes to the worker, unpickled; always ready for more."""

    def __init__(self) -> None:
        self.items: list[object] = []

    def write(self, data: bytes) -> None:
        self.items.append(pickle.loads(data[4:]))

    def is_closing(self) -> bool:
        return False

    async def drain(self) -> None:
        return None


async def _nothing(*_: object) -> None:
    return None


def _link() -> tuple[ControllerLink, RecordingSocket]:
    link = ControllerLink(ControllerBrokerConfig(host="127.0.0.1"), Topics(), _nothing)
    socket = RecordingSocket()
    link._writer = socket  # type: ignore[assignment]
    link.connected.set()
    return link, socket


async def test_a_publish_answered_by_the_worker_returns_its_answer() -> None:
    link, socket = _link()
    for answer in (True, False):
        task = asyncio.create_task(link.publish("pf/v1/controller/routing-table", b"{}", retain=True))
        await asyncio.sleep(0)
        (sent,) = [item for item in socket.items if item[0] == "publish"][-1:]  # type: ignore[index]
        assert sent[2:] == ("pf/v1/controller/routing-table", b"{}", 1, True)  # type: ignore[index]
        link._publishes[sent[1]].set_result(answer)  # type: ignore[index]
        assert await task is answer
    assert link._publishes == {}


async def test_a_publish_cancelled_as_its_answer_arrives_ends_cancelled() -> None:
    link, socket = _link()
    task = asyncio.create_task(link.publish("pf/v1/controller/routing-table", b"{}", retain=True))
    await asyncio.sleep(0)
    (sent,) = [item for item in socket.items if item[0] == "publish"]  # type: ignore[index]
    link._publishes[sent[1]].set_result(True)  # type: ignore[index]
    task.cancel()  # in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await task
    assert link._publishes == {}


async def test_a_publish_without_an_answer_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.mqtt.PUBLISH_TIMEOUT_S", 0.05)
    link, _ = _link()
    assert await link.publish("pf/v1/controller/status", b"{}") is False
    assert link._publishes == {}
