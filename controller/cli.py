"""``probe-fleet``: the controller's command line.

``serve`` runs the controller, ``check`` validates its config, ``demo`` runs the demo (until the
simulated network lands: the modem-layer demo), ``version``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from controller import config as config_module
from probe_agent import __version__, modem_demo
from probe_agent.config import ConfigError

EXIT_CONFIG = 2


def _load(path: str) -> config_module.ControllerConfig | None:
    try:
        return config_module.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return None


async def _serve(config: config_module.ControllerConfig) -> int:
    from controller.service import serve
    from controller.storage.db import DatabaseUnavailable

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(config, stop)
    except DatabaseUnavailable as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe-fleet`` console script."""
    parser = argparse.ArgumentParser(prog="probe-fleet", description="probe-fleet controller")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")
    for name, text in (("serve", "run the controller"), ("check", "validate a controller config")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="controller.toml")
    demo = sub.add_parser("demo", help="run the demo (for now: the modem-layer demo)")
    demo.add_argument("--profile", default="sim800l")
    demo.add_argument("--count", type=int)
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command in ("serve", "check"):
        config = _load(args.config)
        if config is None:
            return EXIT_CONFIG
        if args.command == "check":
            where = config.database_url.split("@")[-1]  # no password in the output
            print(f"{args.config}: ok: database {where}, broker {config.broker.host}:{config.broker.port}")
            return 0
        from probe_agent.logs import setup_logging

        setup_logging("INFO")
        return asyncio.run(_serve(config))
    demo_args = ["--profile", args.profile] + (["--count", str(args.count)] if args.count else [])
    return modem_demo.main(demo_args)


if __name__ == "__main__":
    raise SystemExit(main())
