"""``probe-fleet``: the controller's command line.

Until the controller lands, ``demo`` runs the modem-layer demo (see ``probe_agent.modem_demo``).
"""

from __future__ import annotations

import argparse

from probe_agent import __version__, modem_demo


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe-fleet`` console script."""
    parser = argparse.ArgumentParser(prog="probe-fleet", description="probe-fleet controller")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")
    demo = sub.add_parser("demo", help="run the demo (for now: the modem-layer demo)")
    demo.add_argument("--profile", default="sim800l")
    demo.add_argument("--count", type=int)
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    demo_args = ["--profile", args.profile] + (["--count", str(args.count)] if args.count else [])
    return modem_demo.main(demo_args)


if __name__ == "__main__":
    raise SystemExit(main())
