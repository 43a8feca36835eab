"""The agent's one adapter to MQTT (aiomqtt on paho-mqtt 2): availability, retained state, the
spool drain and the command subscription, over a connection that reconnects by itself.

Availability follows STYLE habit 4: the last will is a retained ``lost``; every connect publishes
a retained ``online``; a clean stop publishes ``offline``; each carries this process's session
id. The agent also listens to its own status topic, so a late will of an old connection that
lands after the new ``online`` is answered at once with ``online`` again.
Observations leave the spool only when the broker acknowledged them (QoS 1 PUBACK); a broken
connection replays everything not acknowledged, in order, after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from probe_agent.config import BrokerConfig
from probe_agent.protocol import AgentStatus, Payload, Topics
from probe_agent.spool import Spool

log = logging.getLogger(__name__)

#: Observations in flight (published, not yet acknowledged) at once: enough to keep a loopback
#: or LAN link busy, small enough that a reconnect replays little.
PUBLISH_WINDOW = 64
PUBLISH_TIMEOUT_S = 30.0
#: MQTT 5 reason codes and 3.1.1 return codes that mean "your credentials are not accepted".
AUTH_FAILURES = {4, 5, 0x86, 0x87}

CommandHandler = Callable[[str, bytes, datetime], Awaitable[None]]


class Uplink:
    """One MQTT connection for one agent; ``run()`` until ``stop()``."""

    def __init__(
        self,
        broker: BrokerConfig,
        topics: Topics,
        agent: str,
        spool: Spool,
        status: Callable[[str], AgentStatus],
        on_command: CommandHandler,
        now: Callable[[], datetime],
        on_controller_online: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.agent = agent
        self.spool = spool
        self._status = status
        self._on_command = on_command
        self._on_controller_online = on_controller_online
        self._now = now
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, tuple[bytes, int]] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        #: Connects after the first one.
        self.reconnects = 0
        self._connects = 0

    # --- what the agent calls ---------------------------------------------------------------

    def wake(self) -> None:
        """New observations are in the spool."""
        self._wake.set()

    async def publish_retained(self, topic: str, payload: Payload, qos: int = 1) -> None:
        """Publish retained state now if connected; it is republished on every reconnect."""
        data = payload.to_json()
        self._retained[topic] = (data, qos)
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                await client.publish(topic, data, qos=qos, retain=True, timeout=PUBLISH_TIMEOUT_S)
            except aiomqtt.MqttError as exc:
                log.info("retained publish to %s deferred to the reconnect: %s", topic, exc)

    async def publish_status(self) -> None:
        """Publish the retained ``online`` status again (its figures changed)."""
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                data = self._status("online").to_json()
                await client.publish(self.topics.status(self.agent), data, qos=1, retain=True)
            except aiomqtt.MqttError as exc:
                log.info("status publish deferred to the reconnect: %s", exc)

    async def publish(self, topic: str, payload: Payload, qos: int = 1) -> None:
        """A one-off message (a command response); dropped with a log line when offline."""
        client = self._client
        if client is None or not self.connected.is_set():
            log.warning("not connected: %s not sent", topic)
            return
        try:
            await client.publish(topic, payload.to_json(), qos=qos, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError as exc:
            log.warning("publish to %s failed: %s", topic, exc)

    async def stop(self) -> None:
        """Publish ``offline`` and disconnect cleanly (the will is not sent)."""
        self._stopping.set()
        self._wake.set()
        client = self._client
        if client is not None and self.connected.is_set():
            try:
                await client.publish(
                    self.topics.status(self.agent),
                    self._status("offline").to_json(),
                    qos=1,
                    retain=True,
                    timeout=5,
                )
            except aiomqtt.MqttError as exc:
                log.warning("could not publish offline: %s", exc)

    # --- the connection ---------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        b = self.broker
        will = aiomqtt.Will(
            self.topics.status(self.agent), self._status("lost").to_json(), qos=1, retain=True
        )
        v5 = b.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0  # the agent's state is in its spool, not the broker
        client = aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.secret(),
            identifier=f"probe-agent-{self.agent}",
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            clean_session=None if v5 else True,
            keepalive=b.keepalive_s,
            tls_context=b.ssl_context(),
            properties=properties,
            timeout=10,
            max_inflight_messages=PUBLISH_WINDOW,
        )
        # The drain keeps a window of publishes pending by design: no warning for that.
        client.pending_calls_threshold = PUBLISH_WINDOW + 16
        return client

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff and jitter, until ``stop()``."""
        delay = 0.0
        while not self._stopping.is_set():
            try:
                async with self._client_for() as client:
                    self._client = client
                    delay = 0.0
                    await self._serve(client)
            except aiomqtt.MqttCodeError as exc:
                if _code(exc.rc) in AUTH_FAILURES:
                    log.error(
                        "broker %s:%s refused the credentials of user %r: %s; retrying",
                        self.broker.host,
                        self.broker.port,
                        self.broker.username,
                        exc,
                    )
                else:
                    log.warning("broker connection failed: %s", exc)
            except aiomqtt.MqttError as exc:
                log.warning("broker %s:%s unreachable or lost: %s", self.broker.host, self.broker.port, exc)
            except (OSError, ssl.SSLError) as exc:
                log.warning("broker %s:%s: %s", self.broker.host, self.broker.port, exc)
            finally:
                self._client = None
                self.connected.clear()
            if self._stopping.is_set():
                return
            delay = min(self.broker.reconnect_max_s, delay * 2 if delay else self.broker.reconnect_initial_s)
            sleep = delay * random.uniform(0.5, 1.0)
            log.info("reconnecting in %.1f s", sleep)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), sleep)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self._connects += 1
        if self._connects > 1:
            self.reconnects += 1
        log.info("connected to %s:%s (connect %d)", self.broker.host, self.broker.port, self._connects)
        await client.subscribe(self.topics.agent_requests(self.agent), qos=1)
        await client.subscribe(self.topics.status(self.agent), qos=1)
        await client.subscribe(self.topics.controller_status(), qos=1)
        await self._announce(client)
        self.connected.set()
        drain = asyncio.create_task(self._drain(client), name="spool drain")
        try:
            async for message in client.messages:
                received_at = self._now()
                await self._dispatch(client, str(message.topic), _bytes(message.payload), received_at)
                if self._stopping.is_set():
                    break
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)

    async def _announce(self, client: aiomqtt.Client) -> None:
        await client.publish(
            self.topics.status(self.agent), self._status("online").to_json(), qos=1, retain=True
        )
        for topic, (data, qos) in list(self._retained.items()):
            await client.publish(topic, data, qos=qos, retain=True)

    async def _dispatch(
        self, client: aiomqtt.Client, topic: str, payload: bytes, received_at: datetime
    ) -> None:
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        if parsed.agent is not None and parsed.agent != self.agent:
            # Not ours: a broker that delivers beyond our subscriptions (amqtt 0.12 sends every
            # retained message on connect) must not make us answer or overwrite another agent.
            log.debug("ignoring %s: it is another agent's topic", topic)
            return
        if parsed.kind == "request" and parsed.command is not None:
            await self._on_command(parsed.command, payload, received_at)
        elif parsed.kind == "status" and not self._stopping.is_set():
            try:
                status = AgentStatus.model_validate_json(payload)
            except ValueError:
                status = None
            if status is None or status.state != "online":
                # A will of an old connection, or someone else's write: we are alive.
                log.warning(
                    "own status read as %s; republishing online", status.state if status else "invalid"
                )
                await client.publish(topic, self._status("online").to_json(), qos=1, retain=True)
        elif parsed.kind == "controller_status" and self._on_controller_online and b'"online"' in payload:
            await self._on_controller_online()

    async def _drain(self, client: aiomqtt.Client) -> None:
        """Publish spooled observations in order, each acked out of the spool by its PUBACK."""
        in_flight: set[asyncio.Task[None]] = set()
        window = asyncio.Semaphore(PUBLISH_WINDOW)
        last_seq = 0
        failed = asyncio.Event()

        acked: list[int] = []
        ack_due = asyncio.Event()

        async def send(seq: int, topic: str, payload: bytes) -> None:
            try:
                await client.publish(topic, payload, qos=1, timeout=PUBLISH_TIMEOUT_S)
            except aiomqtt.MqttError as exc:
                log.info("observation %d not acknowledged (%s); it stays in the spool", seq, exc)
                failed.set()
                return
            finally:
                window.release()
            acked.append(seq)
            ack_due.set()

        async def flush_acks() -> None:
            """Out of the spool in batches, off the event loop: one fsync for many PUBACKs."""
            while True:
                await ack_due.wait()
                ack_due.clear()
                batch = acked[:]
                del acked[:]
                await asyncio.to_thread(self.spool.ack_many, batch)

        flusher = asyncio.create_task(flush_acks(), name="spool acks")

        try:
            while True:
                if failed.is_set():  # replay from the oldest unacknowledged entry
                    await asyncio.gather(*in_flight, return_exceptions=True)
                    await asyncio.sleep(1.0)
                    failed.clear()
                    last_seq = 0
                entries = await asyncio.to_thread(self.spool.pending, PUBLISH_WINDOW, last_seq)
                if not entries:
                    self._wake.clear()
                    if self._stopping.is_set():
                        break
                    await self._wake.wait()
                    continue
                for entry in entries:
                    await window.acquire()
                    task = asyncio.create_task(send(entry.seq, entry.topic, entry.payload))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    last_seq = entry.seq
        finally:
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            if acked:
                await asyncio.to_thread(self.spool.ack_many, acked[:])


def _code(rc: object) -> int | None:
    """A paho return or reason code as an int (MQTT 5 gives ReasonCode objects)."""
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None


def _bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return b"" if payload is None else str(payload).encode()
