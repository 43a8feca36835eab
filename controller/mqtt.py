"""The controller's one adapter to MQTT (aiomqtt on paho 2, as the agent): a persistent session,
QoS 1 messages acknowledged only once they are in the database, and its own availability.

The session outlives the process (clean start off, a session expiry), so observations queue at
the broker while the controller restarts. aiomqtt has no manual-acknowledgement option; we set
paho's on the client it wraps, so a PUBACK goes out only after the message was written: a
controller killed between receipt and write gets the message again from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.config import ControllerBrokerConfig
from probe_agent.protocol import ControllerStatus, Topics

log = logging.getLogger(__name__)

#: Unacknowledged QoS 1 messages the broker may send us at once (MQTT 5 receive maximum).
RECEIVE_MAXIMUM = 2000

Ack = Callable[[], None]
Handler = Callable[[str, bytes, datetime, Ack], Awaitable[None]]


class ControllerLink:
    """The controller's MQTT connection; ``run()`` until ``stop()``."""

    def __init__(
        self,
        broker: ControllerBrokerConfig,
        topics: Topics,
        on_message: Handler,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.broker = broker
        self.topics = topics
        self._on_message = on_message
        self._on_connect = on_connect
        self.session = uuid.uuid4().hex
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._stopping = asyncio.Event()
        self.reconnects = 0

    def subscriptions(self) -> list[str]:
        """What the controller listens to: never the whole tree. Observations may be shared."""
        p = self.topics.prefix
        sms = f"{p}/agents/+/sms"
        if self.broker.shared_group:
            sms = f"$share/{self.broker.shared_group}/{sms}"
        return [
            f"{p}/agents/+/status",
            f"{p}/agents/+/modems/+/state",
            f"{p}/agents/+/health",
            f"{p}/agents/+/response/+",
            sms,
        ]

    def _status(self, state: str) -> bytes:
        at = None if state == "lost" else datetime.now(UTC)
        return ControllerStatus(state=state, session=self.session, at=at).to_json()

    def _client_for(self) -> aiomqtt.Client:
        b = self.broker
        v5 = b.protocol == "5"
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = b.session_expiry_s
            properties.ReceiveMaximum = RECEIVE_MAXIMUM
        client = aiomqtt.Client(
            b.host,
            b.port,
            username=b.username,
            password=b.secret(),
            identifier=b.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.controller_status(), self._status("lost"), qos=1, retain=True),
            clean_session=None if v5 else False,
            clean_start=False if v5 else 3,
            keepalive=b.keepalive_s,
            tls_context=b.ssl_context(),
            properties=properties,
            timeout=10,
            max_queued_incoming_messages=0,
        )
        # Acknowledge only after the write (see the module docstring).
        client._client._manual_ack = True
        return client

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish if connected; False when not (the caller decides whether that matters)."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=10)
        except aiomqtt.MqttError as exc:
            log.warning("publish to %s failed: %s", topic, exc)
            return False
        return True

    def reconnect(self) -> None:
        """Drop the connection (the session stays at the broker): everything not acknowledged
        is delivered again after the reconnect. For a write that failed outside ``run()``."""
        client = self._client
        if client is not None:
            client._client.disconnect()

    async def stop(self) -> None:
        """Leave cleanly: no will (a clean disconnect means ``offline``, not ``lost``)."""
        self._stopping.set()
        await self.publish(self.topics.controller_status(), self._status("offline"), retain=True)

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff and jitter, until ``stop()``."""
        delay = 0.0
        connects = 0
        while not self._stopping.is_set():
            try:
                async with self._client_for() as client:
                    self._client = client
                    delay = 0.0
                    connects += 1
                    self.reconnects = connects - 1
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                log.warning("broker %s:%s unreachable or lost: %s", self.broker.host, self.broker.port, exc)
            except (OSError, ssl.SSLError) as exc:
                log.warning("broker %s:%s: %s", self.broker.host, self.broker.port, exc)
            except Exception:  # a failed write (database down, locked): what was not acknowledged
                # comes again from the broker once the session resumes, so reconnect, never stop.
                log.exception("handling a message failed; reconnecting so the broker resends it")
            finally:
                self._client = None
                self.connected.clear()
            if self._stopping.is_set():
                return
            delay = min(self.broker.reconnect_max_s, delay * 2 if delay else self.broker.reconnect_initial_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.5, 1.0))

    async def _serve(self, client: aiomqtt.Client) -> None:
        for topic in self.subscriptions():
            await client.subscribe(topic, qos=1)
        await client.publish(self.topics.controller_status(), self._status("online"), qos=1, retain=True)
        self.connected.set()
        log.info(
            "controller connected to %s:%s (session %s)", self.broker.host, self.broker.port, self.session
        )
        if self._on_connect is not None:
            await self._on_connect()
        paho = client._client
        async for message in client.messages:
            received_at = datetime.now(UTC)
            mid, qos = message.mid, message.qos

            def ack(mid: int = mid, qos: int = qos) -> None:
                if qos > 0:
                    paho.ack(mid, qos)

            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            await self._on_message(str(message.topic), bytes(payload), received_at, ack)
