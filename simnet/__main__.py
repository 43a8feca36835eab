"""``python -m simnet``: run a simulated mobile network, or check a scenario file.

``run`` starts the scenario's SMSCs and virtual modems, writes ``DIR/simnet.json`` (routes,
handsets, Pis, networks) once everything listens, so a parent process can wait for that file,
and runs until SIGTERM / SIGINT, or until ``--duration`` and a short grace have passed; the
ground truth goes to ``DIR/truth.jsonl``. ``check FILE`` validates a scenario and prints one
line (exit 2 naming every failing field).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from probe_agent.logs import setup_logging
from simnet.network import SimNetwork
from simnet.scenario import Scenario, ScenarioError

EXIT_SCENARIO = 2
#: After ``--duration``: time for the last messages' deliveries and receipts, seconds.
DEFAULT_GRACE_S = 5.0
DESCRIPTION_FILE = "simnet.json"

log = logging.getLogger("simnet")


def _load(path: str | None) -> Scenario | None:
    """The scenario (the packaged default without a path); None after printing its problems."""
    try:
        return Scenario.load(path) if path else Scenario.default()
    except ScenarioError as exc:
        for problem in exc.problems:
            print(f"{exc.path}: {problem}", file=sys.stderr)
        return None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


async def _run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, json=args.log_json)
    scenario = _load(args.scenario)
    if scenario is None:
        return EXIT_SCENARIO
    workdir = Path(args.workdir)
    description = workdir / DESCRIPTION_FILE
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    network = SimNetwork(scenario, workdir, duration_s=args.duration, seed=args.seed)
    async with network:
        write_atomically(description, json.dumps(network.describe(), indent=2) + "\n")
        log.info("listening; described in %s", description)
        timeout_s = args.duration + args.grace if args.duration is not None else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout_s)
        log.info("stopping (%s)", "signal" if stop.is_set() else "duration over")
    return 0


def _check(args: argparse.Namespace) -> int:
    scenario = _load(args.file)
    if scenario is None:
        return EXIT_SCENARIO
    print(f"{args.file}: ok: {scenario.summary()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m simnet``."""
    parser = argparse.ArgumentParser(prog="python -m simnet", description="probe-fleet's simulated network")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario until SIGTERM / SIGINT (or --duration)")
    run.add_argument("--scenario", help="scenario TOML file (default: the packaged default scenario)")
    run.add_argument("--workdir", required=True, help="folder for modem links, simnet.json and truth.jsonl")
    run.add_argument("--duration", type=float, help="the run's length, seconds (at_share changes need it)")
    run.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_S, help="seconds to run on after --duration"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every route's random draws")
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    run.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    check = sub.add_parser("check", help="validate a scenario file and print a summary")
    check.add_argument("file", help="scenario TOML file")
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be positive")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / DESCRIPTION_FILE).unlink(missing_ok=True)  # a stale one must not tell a parent we are up
    return asyncio.run(_run(args))


if __name__ == "__main__":
    raise SystemExit(main())
