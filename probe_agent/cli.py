"""``probe-agent``: the agent's command line.

``run`` the agent, ``check`` a config without touching hardware (exit 2 naming every failing
field), ``modems`` to open each configured port and say what is there, ``listen`` to print each
SMS one modem receives as JSON, ``version``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from probe_agent import __version__
from probe_agent import config as config_module
from probe_agent.modem import ModemPort

EXIT_CONFIG = 2


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def _load(path: str) -> config_module.AgentConfig | None:
    try:
        config = config_module.load(path)
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None
    return config


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    problems = config_module.missing_files(config)
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(
        f"{args.config}: ok: agent {config.agent_id}, {len(config.modems)} modem(s), "
        f"broker {config.broker.host}:{config.broker.port}"
        f"{' with TLS' if config.broker.tls else ''}"
    )
    return 0


async def _modems(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG

    async def probe(modem: config_module.ModemConfig) -> tuple[str, bool]:
        port = ModemPort(modem.port, pin=modem.secret_pin(), profile=modem.profile)
        await port.start()
        try:
            up = await port.wait_connected(args.timeout)
            s = await port.state()
        finally:
            await port.stop()
        if not up:
            return f"{modem.id} {modem.port}: not available: {s.last_error or 'no answer'}", False
        mismatch = ""
        if modem.expected_mcc_mnc and s.mcc_mnc and s.mcc_mnc != modem.expected_mcc_mnc:
            mismatch = f" (expected {modem.expected_mcc_mnc}!)"
        line = (
            f"{modem.id} {modem.port}: {s.manufacturer} {s.model}, IMSI {s.imsi}, ICCID {s.iccid}, "
            f"{s.operator or 'no operator'} {s.mcc_mnc or '-'}{mismatch}, {s.registration}, "
            f"signal {s.signal_dbm if s.signal_dbm is not None else '?'} dBm, "
            f"storage {s.storage_memory} {s.storage_used}/{s.storage_total}"
        )
        return line, not mismatch

    results = await asyncio.gather(*(probe(m) for m in config.modems))
    for line, _ in results:
        print(line, flush=True)
    return 0 if all(ok for _, ok in results) else 1


async def _run(args: argparse.Namespace) -> int:
    from probe_agent.agent import Agent
    from probe_agent.logs import setup_logging

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(config.log.level, json=config.log.json_lines)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(config, config_path=Path(args.config))
    await agent.run(stop)
    return 0


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
    for name, text in (
        ("run", "run the agent"),
        ("check", "validate a config without touching hardware"),
        ("modems", "open each configured modem and print what is there"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="agent.toml")
        if name == "modems":
            cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each modem")
    listen = sub.add_parser("listen", help="open one modem and print each received SMS as JSON")
    listen.add_argument("--port", required=True, help="serial port path, e.g. /dev/gsm/modem-a")
    listen.add_argument("--pin", help="SIM PIN")
    listen.add_argument("--profile", help="modem model profile: sim800l, ec25, e3372")
    listen.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the modem")
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "check":
        return _check(args)
    if args.command != "run":  # run sets up logging from its config
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runner = {"run": _run, "modems": _modems, "listen": _listen}[args.command]
    try:
        return asyncio.run(runner(args))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
