"""The demo's embedded MQTT broker, for machines without mosquitto: amqtt, MQTT 3.1.1 only.

``python -m simnet.broker --port P [--host 127.0.0.1]`` serves one TCP listener on loopback until
SIGTERM / SIGINT (exit 0; 1 when it cannot listen), logging structured lines. Every client is
let in without credentials (so only a loopback address is accepted); retained messages, last
wills, QoS 1 and persistent sessions (clean session off: subscriptions kept and QoS 1 messages
queued while the client is away) live in memory for the broker's life. Its clients must speak
MQTT 3.1.1 (``protocol = "3.1.1"`` in their ``[broker]`` table): amqtt refuses MQTT 5.

What amqtt 0.12.1 does differently from mosquitto (measured; ``tests/test_demo_broker.py``):

- Its AnonymousAuthPlugin marks every client anonymous, and amqtt drops an anonymous client's
  session when it disconnects, clean session off or not. ``OpenAuth`` below lets every client
  in without that mark, so sessions persist as MQTT 3.1.1 says.
- It sends a session's queued messages (on reconnect) and a subscription's retained messages (on
  SUBSCRIBE) before it reads the client's next packet, waits at most 5 s for each PUBACK, then
  forgets the message; one unacknowledged at a disconnect is not resent either. The controller
  acknowledges only once subscribed and written, so its reconnect stalls about 5 s per step,
  and observations queued while it was away are lost if it dies before writing them (mosquitto
  would resend them). The demo's controller does not restart, so the demo does not meet this.
- On connect a client also gets, retained at QoS 0, the retained messages matching any other
  client's subscriptions; queued messages arrive with the retain flag set. An agent handed
  another agent's ``lost`` or ``offline`` status this way republishes it as ``online`` under its
  own id (the controller dead-letters that): only after an agent died and another reconnected.
- No shared subscriptions: the controller's ``shared_group`` must stay unset.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
from dataclasses import dataclass
from typing import Any

from amqtt import __version__ as amqtt_version
from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin
from amqtt.session import Session

from probe_agent.logs import setup_logging

log = logging.getLogger("simnet.broker")

DEFAULT_HOST = "127.0.0.1"
#: How this broker is named to users (the demo's banner).
DESCRIPTION = f"embedded amqtt {amqtt_version} (MQTT 3.1.1)"


class OpenAuth(BaseAuthPlugin):  # type: ignore[misc]  # amqtt is untyped
    """Lets every client in, without marking its session anonymous (see the module docstring)."""

    @dataclass
    class Config:
        """No options."""

    async def authenticate(self, *, session: Session) -> bool:
        return True


class ClientLog(BasePlugin):  # type: ignore[misc]  # amqtt is untyped
    """One log line per client connect and disconnect: what the demo's broker log is for."""

    @dataclass
    class Config:
        """No options."""

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        log.info(
            "client %s connected (clean session %s, will %s)",
            client_id,
            "on" if client_session.clean_session else "off",
            client_session.will_topic if client_session.will_flag else "none",
        )

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        log.info("client %s disconnected", client_id)


def broker_config(host: str, port: int) -> dict[str, Any]:
    """amqtt's configuration: one TCP listener, our two plugins, no $SYS topics."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"simnet.broker.OpenAuth": {}, "simnet.broker.ClientLog": {}},
    }


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(host: str, port: int, stop: asyncio.Event) -> int:
    """Run the broker until ``stop`` is set; 0, or 1 when it could not start."""
    broker = Broker(broker_config(host, port))
    try:
        await broker.start()
    except BrokerError as exc:
        log.error("could not start on %s:%d: %s", host, port, exc)
        return 1
    log.info("%s listening on %s:%d", DESCRIPTION, host, port)
    await stop.wait()
    log.info("stopping")
    await broker.shutdown()
    return 0


async def _main(host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await serve(host, port, stop)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m simnet.broker``."""
    parser = argparse.ArgumentParser(prog="python -m simnet.broker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    parser.add_argument("--host", default=DEFAULT_HOST, help="loopback address to listen on")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    args = parser.parse_args(argv)
    if not _loopback(args.host):
        parser.error(f"--host {args.host}: only a loopback address (clients need no credentials)")
    setup_logging(args.log_level, json=args.log_json)
    if args.log_level.upper() != "DEBUG":  # amqtt and its state machines log every packet at INFO
        for noisy in ("amqtt", "transitions"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(_main(args.host, args.port))


if __name__ == "__main__":
    raise SystemExit(main())
