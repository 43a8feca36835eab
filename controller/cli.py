"""``probe-fleet``: the controller's command line.

``serve`` runs the controller, ``check`` validates its config, ``demo`` runs the whole system on
this machine with simnet (``simnet.demo``), ``version``; ``token add|list|revoke`` manages the
REST API's tokens, ``user add|set|list`` the web UI's users; ``export routing-table --format
json|csv`` writes the routing table from the database, without a running server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from controller import config as config_module
from controller.api.tokens import ROLES
from probe_agent import __version__
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
    from controller.api.app import ApiStartError
    from controller.service import serve
    from controller.storage.db import DatabaseUnavailable

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(config, stop)
    except (DatabaseUnavailable, ApiStartError) as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    return 0


async def _token(config: config_module.ControllerConfig, args: argparse.Namespace) -> int:
    from controller.api import tokens
    from controller.storage.db import DatabaseUnavailable, open_database

    try:
        engine = await open_database(config.database_url)
    except DatabaseUnavailable as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "add" and args.token_stdin:
            await tokens.add_token(engine, args.name, args.role, sys.stdin.readline().strip())
            print(f"token {args.name!r} ({args.role}) stored (its SHA-256)")
        elif args.action == "add":
            token = await tokens.add_token(engine, args.name, args.role)
            print(token)
            print(f"token {args.name!r} ({args.role}): keep it now, it is not shown again", file=sys.stderr)
        elif args.action == "list":
            for info in await tokens.list_tokens(engine):
                used = info.last_used_at.isoformat() if info.last_used_at else "never"
                state = "revoked" if info.revoked else "live"
                print(
                    f"{info.name}\t{info.role}\t{state}\tcreated {info.created_at.isoformat()}\tused {used}"
                )
        else:
            await tokens.revoke_token(engine, args.name)
            print(f"token {args.name!r} revoked")
    except tokens.TokenError as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    return 0


def _password(args: argparse.Namespace) -> str:
    """The new password: one line from standard input with --password-stdin, else asked twice."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask the password on: give it with --password-stdin")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


async def _user(config: config_module.ControllerConfig, args: argparse.Namespace) -> int:
    from controller.storage.db import DatabaseUnavailable, open_database
    from controller.web import users

    try:
        password = _password(args) if args.action == "add" or getattr(args, "password", False) else None
    except ValueError as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    try:
        engine = await open_database(config.database_url)
    except DatabaseUnavailable as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "add":
            assert password is not None
            user = await users.add_user(engine, args.name, args.role, password)
            print(f"user {user.name!r} ({user.role}) added")
        elif args.action == "list":
            for user in await users.list_users(engine):
                seen = user.last_login_at.isoformat() if user.last_login_at else "never"
                state = "disabled" if user.disabled else "enabled"
                print(
                    f"{user.name}\t{user.role}\t{state}\tcreated {user.created_at.isoformat()}\tlogin {seen}"
                )
        else:
            disabled = True if args.disable else False if args.enable else None
            await users.set_user(engine, args.name, role=args.role, password=password, disabled=disabled)
            print(f"user {args.name!r} changed")
    except users.UserError as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    return 0


async def _export(config: config_module.ControllerConfig, args: argparse.Namespace) -> int:
    from controller import routing
    from controller.storage.db import DatabaseUnavailable, open_database

    try:
        engine = await open_database(config.database_url)
    except DatabaseUnavailable as exc:
        print(f"probe-fleet: {exc}", file=sys.stderr)
        return 1
    try:
        async with engine.connect() as conn:
            table = await (
                routing.latest(conn) if args.version is None else routing.version(conn, args.version)
            )
    finally:
        await engine.dispose()
    if table is None:
        which = "no routing table yet" if args.version is None else f"no routing table version {args.version}"
        print(f"probe-fleet: {which} (the controller builds one from the scores)", file=sys.stderr)
        return 1
    text = routing.table_csv(table) if args.format == "csv" else routing.table_json(table) + "\n"
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            await asyncio.to_thread(Path(args.output).write_text, text, encoding="utf-8", newline="")
        except OSError as exc:
            print(f"probe-fleet: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"routing table version {table.version} written to {args.output}", file=sys.stderr)
    return 0


def _export_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    export = sub.add_parser("export", help="export data from the database, no server needed")
    what = export.add_subparsers(dest="what", required=True)
    table = what.add_parser("routing-table", help="the current routing table (or a given version)")
    table.add_argument("--format", choices=("json", "csv"), default="json")
    table.add_argument("--version", type=int, help="a past version (default: the newest)")
    table.add_argument("--output", "-o", help="file to write (default: standard output)")
    table.add_argument(
        "--config", default="controller.toml", help="controller.toml (default: ./controller.toml)"
    )


def _token_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="manage REST API tokens")
    actions = token.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a token; it is printed once, only its SHA-256 is stored")
    add.add_argument("name", help="who or what uses it, e.g. grafana")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument(
        "--token-stdin",
        action="store_true",
        help="store the token read from stdin (made elsewhere, e.g. kept in a vault) instead of a new one",
    )
    revoke = actions.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("name")
    listing = actions.add_parser("list", help="list tokens (names, roles, last use; never the tokens)")
    for cmd in (add, revoke, listing):
        cmd.add_argument(
            "--config", default="controller.toml", help="controller.toml (default: ./controller.toml)"
        )


def _user_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = sub.add_parser("user", help="manage web UI users (the first admin comes from here)")
    actions = user.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user; the password is asked, or read with --password-stdin")
    add.add_argument("name", help="login name")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    change = actions.add_parser("set", help="change a user's role or password, or disable / enable it")
    change.add_argument("name")
    change.add_argument("--role", choices=ROLES)
    change.add_argument("--password", action="store_true", help="set a new password (asked)")
    change.add_argument("--password-stdin", action="store_true", help="with --password: read it from stdin")
    state = change.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true", help="refuse its logins and end its sessions")
    state.add_argument("--enable", action="store_true")
    listing = actions.add_parser("list", help="list users (names, roles, last login)")
    for cmd in (add, change, listing):
        cmd.add_argument(
            "--config", default="controller.toml", help="controller.toml (default: ./controller.toml)"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``probe-fleet`` console script."""
    parser = argparse.ArgumentParser(prog="probe-fleet", description="probe-fleet controller")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("version", help="print the version")
    for name, text in (("serve", "run the controller"), ("check", "validate a controller config")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", required=True, help="controller.toml")
    _token_commands(sub)
    _user_commands(sub)
    _export_commands(sub)
    sub.add_parser(
        "demo", add_help=False, help="run the whole system on this machine with simnet (--help for options)"
    )
    given = sys.argv[1:] if argv is None else argv
    if given[:1] == ["demo"]:  # its options are simnet.demo's own
        from simnet import demo as simnet_demo

        return simnet_demo.main(given[1:])
    args = parser.parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "token":
        config = _load(args.config)
        return EXIT_CONFIG if config is None else asyncio.run(_token(config, args))
    if args.command == "user":
        config = _load(args.config)
        return EXIT_CONFIG if config is None else asyncio.run(_user(config, args))
    if args.command == "export":
        config = _load(args.config)
        return EXIT_CONFIG if config is None else asyncio.run(_export(config, args))
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
    parser.error(f"unknown command {args.command!r}")
    return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
