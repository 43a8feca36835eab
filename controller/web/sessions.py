"""Login sessions of the web UI, kept in the database so that every controller instance knows
them and a logout, a disabled user or a changed password ends them at once.

The browser holds a random session id in an HttpOnly, SameSite=Lax cookie (Secure when served
over TLS); the database keeps only its SHA-256, like the API tokens. Each session has its own
CSRF token, which every form carries back. A session ends after ``idle_s`` without a request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.storage import schema as s
from controller.web.users import User, user_from_row

COOKIE = "pf_session"
#: A session's expiry is written back at most this often (not on every request).
TOUCH_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Session:
    """A live login: who, and the token its forms must carry."""

    key: str
    user: User
    csrf_token: str
    expires_at: datetime

    def csrf_ok(self, given: str | None) -> bool:
        """Whether a form's CSRF token is this session's (in constant time)."""
        return given is not None and hmac.compare_digest(given.encode(), self.csrf_token.encode())


def _key(cookie: str) -> str:
    return hashlib.sha256(cookie.encode()).hexdigest()


async def start_session(engine: AsyncEngine, user: User, idle_s: float) -> tuple[str, Session]:
    """A new session for ``user``: returns the cookie value (never stored) and the session."""
    cookie = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    session = Session(
        key=_key(cookie),
        user=user,
        csrf_token=secrets.token_urlsafe(32),
        expires_at=now + timedelta(seconds=idle_s),
    )
    async with engine.begin() as conn:
        await conn.execute(delete(s.web_sessions).where(s.web_sessions.c.expires_at < now))
        await conn.execute(
            insert(s.web_sessions).values(
                key=session.key,
                user_id=user.id,
                csrf_token=session.csrf_token,
                created_at=now,
                last_seen_at=now,
                expires_at=session.expires_at,
            )
        )
    return cookie, session


async def find_session(engine: AsyncEngine, cookie: str, idle_s: float) -> Session | None:
    """The live session of this cookie (its user enabled), extended by ``idle_s``; else None."""
    if not cookie or len(cookie) > 100:
        return None
    key = _key(cookie)
    now = datetime.now(UTC)
    ws, u = s.web_sessions, s.users
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(u, ws.c.csrf_token, ws.c.expires_at, ws.c.last_seen_at)
                .join(ws, ws.c.user_id == u.c.id)
                .where(ws.c.key == key, ws.c.expires_at > now, ~u.c.disabled)
            )
        ).first()
    if row is None:
        return None
    expires_at = row.expires_at
    if now - row.last_seen_at >= TOUCH_INTERVAL:
        expires_at = now + timedelta(seconds=idle_s)
        async with engine.begin() as conn:
            await conn.execute(
                update(ws).where(ws.c.key == key).values(last_seen_at=now, expires_at=expires_at)
            )
    return Session(key=key, user=user_from_row(row), csrf_token=row.csrf_token, expires_at=expires_at)


async def end_session(engine: AsyncEngine, session: Session) -> None:
    """Log out: the session's cookie stops working at once."""
    async with engine.begin() as conn:
        await conn.execute(delete(s.web_sessions).where(s.web_sessions.c.key == session.key))
