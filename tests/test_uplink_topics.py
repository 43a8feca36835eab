"""The agent acts only on its own topics, whatever the broker delivers.

mosquitto delivers exactly what was subscribed to, so there a foreign topic never arrives; the
embedded broker of the demo (amqtt 0.12) also sends, on connect, the retained messages of other
clients' subscriptions. Tried: another agent's retained ``lost`` status and a request addressed
to another agent, both delivered to this agent's message handler. The MQTT client is a recorder
here (the real one cannot be made to receive a topic it did not subscribe to from mosquitto).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from probe_agent.config import BrokerConfig
from probe_agent.protocol import AgentStatus, CommandResponse, Topics
from probe_agent.spool import Spool
from probe_agent.uplink import Uplink


class RecordingClient:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, **_: Any) -> None:
        self.published.append((topic, payload))


def _status(agent: str, state: str) -> AgentStatus:
    now = datetime.now(UTC)
    return AgentStatus(state=state, agent=agent, session="s1", version="1", started_at=now, at=now)  # type: ignore[arg-type]


async def test_another_agents_status_and_requests_are_ignored(tmp_path: Path) -> None:
    commands: list[str] = []

    async def on_command(command: str, payload: bytes, at: datetime) -> CommandResponse | None:
        commands.append(command)
        return None

    topics = Topics()
    uplink = Uplink(
        BrokerConfig(host="127.0.0.1"),
        topics,
        "pi-a",
        Spool(tmp_path / "spool.db"),
        lambda state: _status("pi-a", state),
        on_command,  # type: ignore[arg-type]
        lambda: datetime.now(UTC),
    )
    client = RecordingClient()
    now = datetime.now(UTC)
    await uplink._dispatch(client, topics.status("pi-b"), _status("pi-b", "lost").to_json(), now)  # type: ignore[arg-type]
    await uplink._dispatch(client, f"{topics.prefix}/agents/pi-b/request/ping", b"{}", now)  # type: ignore[arg-type]
    assert client.published == [] and commands == []
    # its own lost status (a will of an old connection) is still answered with online
    await uplink._dispatch(client, topics.status("pi-a"), _status("pi-a", "lost").to_json(), now)  # type: ignore[arg-type]
    assert [topic for topic, _ in client.published] == [topics.status("pi-a")]
    assert AgentStatus.model_validate_json(client.published[0][1]).state == "online"
    uplink.spool.close()
