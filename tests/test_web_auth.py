"""Web UI access without a browser: users (argon2id hashes), login sessions in the database,
CSRF and origin checks, login throttling, security headers, HTML errors beside the API's JSON
ones, and ``probe-fleet user``. On SQLite and PostgreSQL where the database matters.

What is tried: short and overlong passwords, an unknown role, a taken name, a wrong password, a
disabled user, an expired session, a forged or missing CSRF token, a POST from another origin,
an open redirect in ``next``, a flood of failed logins.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api.app import make_app
from controller.config import ControllerConfig
from controller.storage import schema as s
from controller.storage.db import open_database
from controller.web.guard import LoginThrottle
from controller.web.sessions import end_session, find_session, start_session
from controller.web.users import UserError, add_user, authenticate, list_users, set_user
from tests.db import database, database_url

__all__ = ["database", "database_url"]

PASSWORD = "a good long password"


async def test_users_are_checked_and_stored_as_argon2id_hashes(database: AsyncEngine) -> None:
    user = await add_user(database, "alice", "operator", PASSWORD)
    assert user.role == "operator" and user.may("viewer") and not user.may("admin")
    async with database.connect() as conn:
        stored = (await conn.execute(select(s.users.c.password_hash))).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    for name, role, password, message in (
        ("bob", "operator", "short", "at least 10"),
        ("bob", "operator", "x" * 300, "at most 256"),
        ("bob", "root", PASSWORD, "role 'root'"),
        ("bad name!", "viewer", PASSWORD, "letters, digits"),
        ("alice", "viewer", PASSWORD, "exists"),
    ):
        with pytest.raises(UserError, match=message):
            await add_user(database, name, role, password)
    assert [u.name for u in await list_users(database)] == ["alice"]

    assert await authenticate(database, "alice", "wrong password") is None
    assert await authenticate(database, "nobody", PASSWORD) is None
    logged = await authenticate(database, "alice", PASSWORD)
    assert logged is not None and logged.name == "alice"
    assert (await list_users(database))[0].last_login_at is not None

    cookie, session = await start_session(database, logged, idle_s=3600)
    found = await find_session(database, cookie, idle_s=3600)
    assert found is not None and found.user.name == "alice" and found.csrf_ok(session.csrf_token)
    assert not found.csrf_ok("forged") and not found.csrf_ok(None)
    assert await find_session(database, cookie + "x", idle_s=3600) is None
    async with database.connect() as conn:  # only the cookie's hash is kept
        keys = (await conn.execute(select(s.web_sessions.c.key))).scalars().all()
    assert cookie not in keys and len(keys) == 1

    await set_user(database, "alice", disabled=True)  # ends its sessions, refuses its logins
    assert await find_session(database, cookie, idle_s=3600) is None
    assert await authenticate(database, "alice", PASSWORD) is None
    await set_user(database, "alice", disabled=False, password="another good password")
    assert await authenticate(database, "alice", PASSWORD) is None
    assert await authenticate(database, "alice", "another good password") is not None
    with pytest.raises(UserError, match="no user named"):
        await set_user(database, "nobody", role="admin")


async def test_sessions_expire_when_idle_and_end_at_logout(database: AsyncEngine) -> None:
    user = await add_user(database, "carol", "viewer", PASSWORD)
    cookie, session = await start_session(database, user, idle_s=3600)
    async with database.begin() as conn:
        await conn.execute(update(s.web_sessions).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert await find_session(database, cookie, idle_s=3600) is None
    cookie, session = await start_session(database, user, idle_s=3600)
    await end_session(database, session)
    assert await find_session(database, cookie, idle_s=3600) is None


def test_login_throttle_counts_names_and_addresses_in_a_window() -> None:
    throttle = LoginThrottle(max_failures=2, window_s=0.3)
    keys = ("ip:10.0.0.1", "user:alice")
    assert throttle.retry_after_s(*keys) == 0
    throttle.failed(*keys)
    throttle.failed(*keys)
    wait = throttle.retry_after_s(*keys)
    assert 0 < wait <= 0.3  # the name is locked
    assert throttle.retry_after_s("ip:10.0.0.1", "user:bob") == 0  # the address is not (yet)
    throttle.succeeded("user:alice")
    assert throttle.retry_after_s("user:alice") == 0
    for name in range(8):  # an address that sprays names is locked after 4x the limit
        throttle.failed("ip:10.0.0.2", f"user:n{name}")
    assert throttle.retry_after_s("ip:10.0.0.2", "user:new") > 0
    for name in range(LoginThrottle.MAX_KEYS + 10):  # memory stays bounded
        throttle.failed(f"user:spray{name}")
    assert len(throttle._failures) <= LoginThrottle.MAX_KEYS


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[Any, Any]]:
    engine = await open_database(f"sqlite:///{tmp_path / 'c.db'}")
    await add_user(engine, "admin", "admin", PASSWORD)
    config = ControllerConfig.model_validate({"broker": {"host": "127.0.0.1", "port": 1883}})
    client = TestClient(TestServer(make_app(engine, config)))
    await client.start_server()
    yield client
    await client.close()
    await engine.dispose()


async def _log_in(client: TestClient[Any, Any], next_path: str = "/") -> Any:
    form = await (await client.get("/login")).text()
    token = re.search(r'name="login_token" value="([^"]+)"', form)
    assert token is not None
    return await client.post(
        "/login",
        data={"name": "admin", "password": PASSWORD, "login_token": token.group(1), "next": next_path},
        allow_redirects=False,
    )


async def test_the_guard_checks_session_csrf_origin_and_sets_headers(client: TestClient[Any, Any]) -> None:
    response = await client.get("/?country=GB", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/login?next=/?country=GB"
    assert (await client.get("/events", allow_redirects=False)).status == 401

    # the login form's own CSRF token: a post without the cookie's value is refused
    refused = await client.post("/login", data={"name": "admin", "password": PASSWORD, "login_token": "x"})
    assert refused.status == 403 and "expired" in await refused.text()

    response = await _log_in(client, next_path="//evil.example/")  # no open redirect
    assert response.status == 303 and response.headers["Location"] == "/"
    assert "HttpOnly" in response.headers["Set-Cookie"] and "SameSite=Lax" in response.headers["Set-Cookie"]

    page = await client.get("/")
    assert page.status == 200
    for header in ("Content-Security-Policy", "X-Content-Type-Options", "X-Frame-Options"):
        assert header in page.headers
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', await page.text())
    assert csrf is not None

    assert (await client.post("/logout", data={})).status == 403
    assert (await client.post("/logout", data={"csrf_token": "forged"})).status == 403
    other_site = await client.post(
        "/logout", data={"csrf_token": csrf.group(1)}, headers={"Origin": "http://evil.example"}
    )
    assert other_site.status == 403 and "another site" in await other_site.text()

    missing = await client.get("/no-such-page")
    assert missing.status == 404 and missing.content_type == "text/html"
    api_missing = await client.get("/api/v1/no-such-thing")
    assert api_missing.status == 404 and api_missing.content_type == "application/json"

    out = await client.post("/logout", data={"csrf_token": csrf.group(1)}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/login"
    assert (await client.get("/", allow_redirects=False)).status == 303


def test_cli_user_add_list_and_set(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'database_url = "sqlite:///{tmp_path / "c.db"}"\n[broker]\nhost = "127.0.0.1"\n')

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controller.cli", "user", *args, "--config", str(config)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    added = cli("add", "root-admin", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    weak = cli("add", "weak", "--role", "viewer", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "at least 10" in weak.stderr
    no_tty = cli("add", "quiet", "--role", "viewer")
    assert no_tty.returncode == 1 and "--password-stdin" in no_tty.stderr
    last = cli("set", "root-admin", "--role", "operator")  # nobody would be left to manage users
    assert last.returncode == 1 and "last enabled admin" in last.stderr
    assert cli("set", "root-admin", "--disable").returncode == 1
    assert cli("add", "second", "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    assert cli("set", "root-admin", "--role", "operator").returncode == 0
    listing = cli("list")
    assert listing.returncode == 0 and "root-admin\toperator\tenabled" in listing.stdout
    assert PASSWORD not in listing.stdout
