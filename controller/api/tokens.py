"""API tokens: made, listed and revoked by ``probe-fleet token``, checked on every API request.

A token is shown once, when it is made; the database keeps only its SHA-256, so a copy of the
database does not let anyone in. Tokens are long random strings, so a plain hash is enough (no
salt or slow hash: nothing to guess), and lookups go by the hash's unique index.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Row, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from controller.storage import schema as s

Role = Literal["viewer", "operator", "admin"]
#: Each role may do what the roles before it may: viewer reads; operator also writes campaigns,
#: routes and networks; admin may do everything.
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")

#: Tokens start with this, so a leaked one is recognisable (secret scanners, logs).
TOKEN_PREFIX = "pf_"
#: Random bytes in a token (256 bits).
TOKEN_BYTES = 32
#: Longest Authorization value looked at; real tokens are 46 characters.
MAX_TOKEN_CHARS = 256
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$"
#: A token made elsewhere and given to ``add_token``: as random as ours, at most as long as looked at.
GIVEN_TOKEN_PATTERN = rf"^{TOKEN_PREFIX}[A-Za-z0-9_-]{{43,{MAX_TOKEN_CHARS - len(TOKEN_PREFIX)}}}$"


class TokenError(Exception):
    """A token command that cannot be done: a taken name, an unknown one, a bad role."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as stored, without the secret."""

    id: int
    name: str
    role: Role
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


def new_token() -> str:
    """A fresh random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    """What the database keeps of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _info(row: Row[Any]) -> TokenInfo:
    return TokenInfo(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        last_used_at=row.last_used_at,
        revoked=row.revoked,
    )


def check_given_token(token: str) -> None:
    """Raise :class:`TokenError` unless ``token`` looks like one of ours with at least as much
    randomness: ``pf_`` and 43 or more URL-safe base64 characters."""
    if not re.fullmatch(GIVEN_TOKEN_PATTERN, token):
        raise TokenError(
            f"a given token must be {TOKEN_PREFIX!r} and at least 43 characters of A-Z a-z 0-9 _ - "
            "(256 bits), "
            f"e.g. python3 -c 'import secrets; print(\"{TOKEN_PREFIX}\" + secrets.token_urlsafe(32))'"
        )


async def add_token(engine: AsyncEngine, name: str, role: str, token: str | None = None) -> str:
    """Make a token named ``name`` with ``role``; returns the token, which is not kept anywhere.
    ``token`` stores one made elsewhere (a provisioning secret kept in a vault) instead of a new
    random one."""
    if token is not None:
        check_given_token(token)
    if role not in ROLES:
        raise TokenError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not re.fullmatch(NAME_PATTERN, name):
        raise TokenError(
            f"token name {name!r}: letters, digits and _ . @ - (up to 64), starting with a letter or digit"
        )
    token = token if token is not None else new_token()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(s.api_tokens).values(
                    name=name, token_hash=token_hash(token), role=role, created_at=datetime.now(UTC)
                )
            )
    except IntegrityError:
        raise TokenError(f"a token named {name!r} exists (revoke it, or pick another name)") from None
    return token


async def list_tokens(engine: AsyncEngine) -> list[TokenInfo]:
    """Every token, revoked ones included, by name."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(s.api_tokens).order_by(s.api_tokens.c.name))
        return [_info(row) for row in rows]


async def revoke_token(engine: AsyncEngine, name: str) -> None:
    """Revoke the token named ``name``; it stops working at once."""
    async with engine.begin() as conn:
        done = await conn.execute(
            update(s.api_tokens).where(s.api_tokens.c.name == name).values(revoked=True)
        )
    if done.rowcount == 0:
        raise TokenError(f"no token named {name!r}")


async def find_token(conn: AsyncConnection, token: str) -> TokenInfo | None:
    """The live (not revoked) token with this secret, or None."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_CHARS:
        return None
    row = (
        await conn.execute(
            select(s.api_tokens).where(
                s.api_tokens.c.token_hash == token_hash(token), ~s.api_tokens.c.revoked
            )
        )
    ).first()
    return _info(row) if row else None


async def touch(conn: AsyncConnection, token_id: int, now: datetime) -> None:
    """Record that a token was used."""
    await conn.execute(update(s.api_tokens).where(s.api_tokens.c.id == token_id).values(last_used_at=now))
