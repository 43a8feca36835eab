"""``probe-agent``: the agent's command line.

For now it offers ``listen`` (open one modem, print each SMS as a JSON line) and ``version``;
``run``, ``check`` and ``modems`` come with the agent issue.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from datetime import datetime
from typing import Any

from probe_agent import __version__
from probe_agent.modem import ModemPort


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


async def _listen(args: argparse.Namespace) -> int:
    port = ModemPort(args.port, pin=args.pin, profile=args.profile)
    await port.start()
    if not await port.wait_connected(args.connect_timeout):
        print(f"modem on {args.port} did not come up: {(await port.state()).last_error}", file=sys.stderr)
        await port.stop()
        return 1
    state = await port.state()
    print(json.dumps({"state": {k: _jsonable(v) for k, v in dataclasses.asdict(state).items()}}), flush=True)
    try:
        async for sms in port.received():
            row = {k: _jsonable(v) for k, v in dataclasses.asdict(sms).items()}
            print(json.dumps({"sms": row}, ensure_ascii=False), flush=True)
    finally:
        await port.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe-agent`` console script."""
    parser = argparse.ArgumentParser(prog="probe-agent", description="probe-fleet agent")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")
    listen = sub.add_parser("listen", help="open one modem and print each received SMS as JSON")
    listen.add_argument("--port", required=True, help="serial port path, e.g. /dev/serial/by-path/...")
    listen.add_argument("--pin", help="SIM PIN")
    listen.add_argument("--profile", help="modem model profile: sim800l, ec25, e3372")
    listen.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the modem")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        return asyncio.run(_listen(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
