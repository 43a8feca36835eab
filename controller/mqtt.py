"""The controller's one adapter to MQTT (aiomqtt on paho 2, as the agent): a persistent session,
QoS 1 messages acknowledged only once they are in the database, and its own availability.

The session outlives the process (clean start off, a session expiry), so observations queue at
the broker while the controller restarts. aiomqtt has no manual-acknowledgement option; we set
paho's on the client it wraps, so a PUBACK goes out only after the message was written: a
controller killed between receipt and write gets the message again from the broker.

The connection lives in a child process, the MQTT worker (``python -m controller.mqtt``): paho
parses every packet in Python, and in the controller's interpreter that took about as much of
the one core the GIL allows as all of ingest did, so ingest drained the broker at well under
the rate of a bare paho subscriber (bench/ingest.py). The worker owns the connection, the will,
the subscriptions and the reconnects; it forwards what it receives in batches over a socket
pair and takes back acknowledgements, publishes and reconnect requests, in order. It is a pipe,
not a buffer that acknowledges: the broker gets a PUBACK only when ingest acknowledged after its
write, so delivery stays at least once. The worker ignores SIGINT and SIGTERM (the controller
stops it once its own clean stop is done) and exits at once when the controller's end of the
socket closes (the controller was killed): the broker then sees the connection drop and
publishes the will.

Inside the worker, messages are taken from paho's ``on_message`` into an ``_Inbox`` rather than
through aiomqtt's message iterator, which costs a task and an ``asyncio.wait`` per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import random
import signal
import socket
import ssl
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.config import ControllerBrokerConfig
from probe_agent.protocol import ControllerStatus, Topics

log = logging.getLogger(__name__)

#: Unacknowledged QoS 1 messages the broker may send us at once (MQTT 5 receive maximum).
RECEIVE_MAXIMUM = 2000
#: A publish through the worker that has no answer by then counts as failed.
PUBLISH_TIMEOUT_S = 10.0
#: How long a stopping worker may take to disconnect cleanly before it is killed.
WORKER_STOP_S = 10.0

Ack = Callable[[], None]
Handler = Callable[[str, bytes, datetime, Ack], Awaitable[None]]
#: One received message as the worker forwards it: topic, payload, packet id, QoS.
Forwarded = tuple[str, bytes, int, int]

_LENGTH = struct.Struct("!I")


def _frame(item: Any) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next item from the other process; ``IncompleteReadError`` once it is gone. Only our
    own two processes share this socket pair, so unpickling trusts it."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


def subscriptions(topics: Topics, broker: ControllerBrokerConfig) -> list[str]:
    """What the controller listens to: never the whole tree. Observations may be shared."""
    p = topics.prefix
    sms = f"{p}/agents/+/sms"
    if broker.shared_group:
        sms = f"$share/{broker.shared_group}/{sms}"
    return [
        f"{p}/agents/+/status",
        f"{p}/agents/+/modems/+/state",
        f"{p}/agents/+/health",
        f"{p}/agents/+/response/+",
        sms,
    ]


def _status(session: str, state: str) -> bytes:
    at = None if state == "lost" else datetime.now(UTC)
    return ControllerStatus(state=state, session=session, at=at).to_json()


class ControllerLink:
    """The controller's MQTT connection, through the MQTT worker; ``run()`` until ``stop()``."""

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
        self._stopping = asyncio.Event()
        self.reconnects = 0
        self._connects = 0
        self._writer: asyncio.StreamWriter | None = None
        #: Which worker this is, and PUBACKs to send it: (worker, its connection, packet id, QoS).
        self._worker = 0
        self._acks: list[tuple[int, int, int, int]] = []
        self._publishes: dict[int, asyncio.Future[bool]] = {}
        self._next_publish = 0

    def subscriptions(self) -> list[str]:
        """What the controller listens to: never the whole tree. Observations may be shared."""
        return subscriptions(self.topics, self.broker)

    def _send(self, item: Any) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(_frame(item))
        return True

    def _ack(self, worker: int, connection: int, mid: int, qos: int) -> None:
        """Queue one PUBACK; the queue goes to the worker once per loop iteration, in one frame.
        One for a message of an earlier worker is dropped: packet ids are per connection, and the
        broker resends that message on the new one (ingest then drops the duplicate)."""
        if worker != self._worker:
            return
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._send_acks)
        self._acks.append((worker, connection, mid, qos))

    def _send_acks(self) -> None:
        if self._acks:
            acks, self._acks = self._acks, []
            self._send(("ack", [(c, mid, qos) for w, c, mid, qos in acks if w == self._worker]))

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish if connected; False when not (the caller decides whether that matters)."""
        if not self.connected.is_set():
            return False
        self._send_acks()  # what was acknowledged before this publish goes first
        self._next_publish += 1
        ref = self._next_publish
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._publishes[ref] = done
        try:
            if not self._send(("publish", ref, topic, payload, qos, retain)):
                return False
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result instead of
            # raising when it is cancelled just as the answer arrives, and a duty cancelled at
            # step-down (the routing table's publish) would then run on and never end.
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                with contextlib.suppress(OSError):  # the worker is gone: its answer says False
                    await self._drain()
                return await done
        except TimeoutError:
            log.warning("publish to %s: no answer from the MQTT worker in %.0f s", topic, PUBLISH_TIMEOUT_S)
            return False
        finally:
            self._publishes.pop(ref, None)

    async def _drain(self) -> None:
        if self._writer is not None:
            await self._writer.drain()

    def reconnect(self) -> None:
        """Drop the connection (the session stays at the broker): everything not acknowledged
        is delivered again after the reconnect. For a write that failed outside ``run()``."""
        self._send(("reconnect",))

    async def stop(self) -> None:
        """Leave cleanly: no will (a clean disconnect means ``offline``, not ``lost``)."""
        self._stopping.set()
        await self.publish(self.topics.controller_status(), _status(self.session, "offline"), retain=True)

    async def run(self) -> None:
        """Run the MQTT worker, again with backoff should it end, until ``stop()`` (or cancelled:
        the worker is then told to disconnect cleanly and waited for)."""
        delay = 0.0
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            try:
                await self._run_worker()
            except (OSError, EOFError, asyncio.IncompleteReadError, pickle.PickleError) as exc:
                log.warning("the MQTT worker failed: %s", exc)
            except Exception:  # what was not acknowledged comes again through the next worker
                log.exception("the link to the MQTT worker failed; starting another")
            if self._stopping.is_set():
                return
            if asyncio.get_running_loop().time() - started > self.broker.reconnect_max_s:
                delay = 0.0
            delay = min(self.broker.reconnect_max_s, delay * 2 if delay else self.broker.reconnect_initial_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay * random.uniform(0.5, 1.0))

    async def _run_worker(self) -> None:
        self._worker += 1
        ours, theirs = socket.socketpair()
        with ours:
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "controller.mqtt",
                    str(theirs.fileno()),
                    pass_fds=(theirs.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=_worker_env(),
                )
            finally:
                theirs.close()
            reader, writer = await asyncio.open_connection(sock=ours)
            self._writer = writer
            try:
                self._send(("start", self.broker, self.topics.prefix, self.session))
                await self._serve(reader)
            finally:
                self._writer = None
                self.connected.clear()
                self._acks.clear()  # the worker is gone: the broker resends them
                for done in self._publishes.values():
                    if not done.done():
                        done.set_result(False)
                await _stop_worker(proc, writer)

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        """What the worker sends, until it ends: messages (handed to ingest in order, each with
        an acknowledgement that goes back to the worker), connection changes, publish results,
        log records."""
        handle, worker = self._on_message, self._worker
        dropped = 0  # a connection whose messages are no longer taken (the broker resends them)
        while True:
            item = await _read_frame(reader)
            kind = item[0]
            if kind == "messages":
                _, connection, received_s, messages = item
                if connection == dropped:
                    continue
                received_at = datetime.fromtimestamp(received_s, UTC)
                for topic, payload, mid, qos in messages:
                    ack = cast(Ack, partial(self._ack, worker, connection, mid, qos)) if qos else _no_ack
                    try:
                        await handle(topic, payload, received_at, ack)
                    except Exception:  # a failed write: what was not acknowledged comes again
                        log.exception("handling a message failed; reconnecting so the broker resends it")
                        dropped = connection
                        self.reconnect()
                        break
            elif kind == "published":
                done = self._publishes.get(item[1])
                if done is not None and not done.done():
                    done.set_result(item[2])
            elif kind == "connected":
                self._connects += 1
                self.reconnects = self._connects - 1
                self.connected.set()
                log.info(
                    "controller connected to %s:%s (session %s)",
                    self.broker.host,
                    self.broker.port,
                    self.session,
                )
                if self._on_connect is not None:
                    await self._on_connect()
            elif kind == "disconnected":
                self.connected.clear()
            elif kind == "log":
                _, level, text = item
                log.log(level, "MQTT worker: %s", text)


def _no_ack() -> None:
    """QoS 0 messages (health) are not acknowledged."""


def _worker_env() -> dict[str, str]:
    """The controller's environment (broker secrets may come from it), with this package
    importable in the worker however the controller found it."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


async def _stop_worker(proc: asyncio.subprocess.Process, writer: asyncio.StreamWriter) -> None:
    """Tell the worker to disconnect cleanly and wait for it; kill it if it does not exit."""
    if proc.returncode is None:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(_frame(("stop",)))
            await asyncio.wait_for(writer.drain(), WORKER_STOP_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), WORKER_STOP_S)
        if proc.returncode is None:
            log.warning("the MQTT worker did not stop in %.0f s; killing it", WORKER_STOP_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    writer.close()
    with contextlib.suppress(OSError, RuntimeError):
        await writer.wait_closed()


# --- the MQTT worker (child process) -------------------------------------------------------------


class _Inbox:
    """Messages paho received on one connection, for the forwarder in ``_Worker._serve``. ``put``
    is paho's ``on_message``; it runs in the loop's thread (aiomqtt calls ``loop_read`` from a
    reader callback), so it only appends and, when the forwarder waits, wakes it once."""

    def __init__(self) -> None:
        self.messages: deque[paho_mqtt.MQTTMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, _client: paho_mqtt.Client, _userdata: Any, message: paho_mqtt.MQTTMessage) -> None:
        self.messages.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, disconnected: asyncio.Future[None]) -> None:
        """Until a message is in, or the connection is gone (then raises ``MqttError``)."""
        while not self.messages:
            if disconnected.done():
                cause = disconnected.exception()
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            wake = partial(_wake, waiter)
            disconnected.add_done_callback(wake)
            try:
                await waiter
            finally:
                self._waiter = None
                disconnected.remove_done_callback(wake)


def _wake(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _ToController(logging.Handler):
    """The worker's log records, sent to the controller to be logged there (from any thread:
    paho connects from aiomqtt's executor thread)."""

    def __init__(self, worker: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.INFO)
        self.worker = worker
        self.loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
            self.loop.call_soon_threadsafe(self.worker.send, ("log", record.levelno, text))


class _Worker:
    """The MQTT connection, in the worker process: connects, subscribes, announces the
    controller online, forwards what comes, reconnects with backoff and jitter, until told to
    stop or the controller is gone."""

    def __init__(
        self,
        writer: asyncio.StreamWriter,
        broker: ControllerBrokerConfig,
        topics: Topics,
        session: str,
    ) -> None:
        self.writer = writer
        self.broker = broker
        self.topics = topics
        self.session = session
        self._client: aiomqtt.Client | None = None
        #: Which connection the client is: an acknowledgement for another one is dropped (the
        #: broker resends that message on the new connection, and ingest drops the duplicate).
        self._connection = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, item: Any) -> None:
        if not self.writer.is_closing():
            self.writer.write(_frame(item))

    def _client_for(self, inbox: _Inbox) -> aiomqtt.Client:
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
            will=aiomqtt.Will(
                self.topics.controller_status(), _status(self.session, "lost"), qos=1, retain=True
            ),
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
        # Before connecting: a resumed session's queued messages come right after the CONNACK.
        client._client.on_message = inbox.put
        return client

    async def commands(self, reader: asyncio.StreamReader) -> None:
        """What the controller asks, in order, until it says stop or is gone."""
        while True:
            item = await _read_frame(reader)
            kind = item[0]
            if kind == "ack":
                client = self._client
                if client is None:
                    continue
                paho, current = client._client, self._connection
                for connection, mid, qos in item[1]:
                    if connection == current:
                        paho.ack(mid, qos)
            elif kind == "publish":
                task = asyncio.create_task(self._publish(*item[1:]))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif kind == "reconnect":
                if self._client is not None:
                    self._client._client.disconnect()
            elif kind == "stop":
                return

    async def _publish(self, ref: int, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        ok = False
        client = self._client
        if client is not None:
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=PUBLISH_TIMEOUT_S)
                ok = True
            except aiomqtt.MqttError as exc:
                log.warning("publish to %s failed: %s", topic, exc)
        self.send(("published", ref, ok))

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff and jitter, until stopped (cancelled)."""
        delay = 0.0
        while True:
            inbox = _Inbox()
            try:
                async with self._client_for(inbox) as client:
                    self._client = client
                    self._connection += 1
                    delay = 0.0
                    await self._serve(client, inbox)
            except aiomqtt.MqttError as exc:
                log.warning("broker %s:%s unreachable or lost: %s", self.broker.host, self.broker.port, exc)
            except (OSError, ssl.SSLError) as exc:
                log.warning("broker %s:%s: %s", self.broker.host, self.broker.port, exc)
            except Exception:  # never give up on the broker: the controller cannot work without it
                log.exception("the connection to broker %s:%s failed", self.broker.host, self.broker.port)
            finally:
                self._client = None
                self.send(("disconnected",))
            delay = min(self.broker.reconnect_max_s, delay * 2 if delay else self.broker.reconnect_initial_s)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _serve(self, client: aiomqtt.Client, inbox: _Inbox) -> None:
        for topic in subscriptions(self.topics, self.broker):
            await client.subscribe(topic, qos=1)
        await client.publish(
            self.topics.controller_status(), _status(self.session, "online"), qos=1, retain=True
        )
        self.send(("connected",))
        connection = self._connection
        messages = inbox.messages
        while True:
            await inbox.wait(client._disconnected)
            received_s = time.time()  # a float pickles faster than an aware datetime
            batch: list[Forwarded] = []
            while messages:
                message = messages.popleft()
                payload = message.payload
                batch.append(
                    (
                        message.topic,
                        payload if type(payload) is bytes else bytes(payload),
                        message.mid,
                        message.qos,
                    )
                )
            self.send(("messages", connection, received_s, batch))
            await self.writer.drain()  # the controller is behind: let paho's socket fill instead


async def _worker_main(fd: int) -> None:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    start = await _read_frame(reader)
    _, broker, prefix, session = start
    worker = _Worker(writer, broker, Topics(prefix), session)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(_ToController(worker, asyncio.get_running_loop()))
    connection = asyncio.create_task(worker.run())
    try:
        await worker.commands(reader)
    except (asyncio.IncompleteReadError, OSError):
        # The controller is gone (killed): leave without a DISCONNECT, so the broker publishes
        # the will and keeps the session for the next controller.
        os._exit(0)
    connection.cancel()  # a clean DISCONNECT: the controller published its offline status
    with contextlib.suppress(asyncio.CancelledError):
        await connection
    writer.close()


def worker_main(argv: list[str]) -> None:
    """Entry point of the MQTT worker: ``python -m controller.mqtt <socket fd>``."""
    # The controller stops it after its own clean stop (a terminal's Ctrl-C and systemd's
    # SIGTERM reach the whole process group).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(_worker_main(int(argv[1])))


if __name__ == "__main__":
    worker_main(sys.argv)
