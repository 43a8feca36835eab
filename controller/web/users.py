"""Users of the web UI: a name, a role and a password kept only as an argon2id hash.

``probe-fleet user add NAME --role ROLE`` makes them (the first admin comes from there); the UI
checks a login with :func:`authenticate`. The roles are the API tokens' ones: a viewer reads, an
operator also changes campaigns, routes and networks, an admin may do everything.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from controller.api.tokens import NAME_PATTERN, ROLES, Role
from controller.storage import schema as s

#: Shortest password accepted (NIST SP 800-63B asks for at least 8; operators get more).
MIN_PASSWORD_CHARS = 10
#: Longest password accepted: argon2 takes any length, this only bounds the work per attempt.
MAX_PASSWORD_CHARS = 256

_hasher = PasswordHasher()
#: Checked when the name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("probe-fleet: no such user")


class UserError(Exception):
    """A user command that cannot be done: a taken name, a bad role, a weak password."""


@dataclass(frozen=True)
class User:
    """A user as stored, without the password hash."""

    id: int
    name: str
    role: Role
    created_at: datetime
    last_login_at: datetime | None
    disabled: bool

    def may(self, role: Role) -> bool:
        """Whether this user's role is at least ``role``."""
        return ROLES.index(self.role) >= ROLES.index(role)


def user_from_row(row: Row[Any]) -> User:
    """A :class:`User` from a row of ``users`` (or of a join selecting its columns)."""
    return User(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        last_login_at=row.last_login_at,
        disabled=row.disabled,
    )


def check_password(password: str) -> None:
    """Raise :class:`UserError` when a new password is too short or too long."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise UserError(f"the password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise UserError(f"the password may have at most {MAX_PASSWORD_CHARS} characters")


async def add_user(engine: AsyncEngine, name: str, role: str, password: str) -> User:
    """Make a user; the password is stored as its argon2id hash only."""
    if role not in ROLES:
        raise UserError(f"role {role!r}: one of {', '.join(ROLES)}")
    if not re.fullmatch(NAME_PATTERN, name):
        raise UserError(
            f"user name {name!r}: letters, digits and _ . @ - (up to 64), starting with a letter or digit"
        )
    check_password(password)
    now = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(
                insert(s.users).values(
                    name=name, role=role, password_hash=_hasher.hash(password), created_at=now, disabled=False
                )
            )
            (user_id,) = result.inserted_primary_key or (None,)
    except IntegrityError:
        raise UserError(f"a user named {name!r} exists") from None
    return User(id=int(user_id), name=name, role=role, created_at=now, last_login_at=None, disabled=False)  # type: ignore[arg-type]


async def list_users(engine: AsyncEngine) -> list[User]:
    """Every user, by name."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(s.users).order_by(s.users.c.name))
        return [user_from_row(row) for row in rows]


async def set_user(
    engine: AsyncEngine,
    name: str,
    *,
    role: str | None = None,
    password: str | None = None,
    disabled: bool | None = None,
) -> None:
    """Change a user's role, password or disabled flag; a disabled user's sessions end at once.
    Refused when it would leave no enabled admin (nobody could manage users from the UI)."""
    values: dict[str, Any] = {}
    if role is not None:
        if role not in ROLES:
            raise UserError(f"role {role!r}: one of {', '.join(ROLES)}")
        values["role"] = role
    if password is not None:
        check_password(password)
        values["password_hash"] = _hasher.hash(password)
    if disabled is not None:
        values["disabled"] = disabled
    if not values:
        raise UserError("nothing to change: give a role, a password or disable/enable")
    c = s.users.c
    async with engine.begin() as conn:
        row = (await conn.execute(select(c.role, c.disabled).where(c.name == name))).first()
        if row is None:
            raise UserError(f"no user named {name!r}")
        if row.role == "admin" and not row.disabled and (values.get("role", "admin") != "admin" or disabled):
            others = select(func.count()).where(c.role == "admin", ~c.disabled, c.name != name)
            if not await conn.scalar(others):
                raise UserError(
                    f"{name!r} is the last enabled admin: make another admin before demoting or disabling"
                )
        await conn.execute(update(s.users).where(c.name == name).values(**values))
        if disabled or password is not None:
            users = select(s.users.c.id).where(s.users.c.name == name).scalar_subquery()
            await conn.execute(s.web_sessions.delete().where(s.web_sessions.c.user_id == users))


def _verify(stored: str, password: str) -> bool:
    try:
        return bool(_hasher.verify(stored, password))
    except (VerificationError, InvalidHashError):
        return False


async def authenticate(engine: AsyncEngine, name: str, password: str) -> User | None:
    """The enabled user with this name and password, or None. Takes an argon2 check's time
    whether or not the name exists, so the answer's timing does not tell which names do."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(s.users).where(s.users.c.name == name[:64]))).first()
    stored = row.password_hash if row is not None else _DUMMY_HASH
    # argon2 is slow on purpose (tens of ms, 64 MiB): off the event loop.
    if not await asyncio.to_thread(_verify, stored, password[:MAX_PASSWORD_CHARS]):
        return None
    if row is None or row.disabled:
        return None
    now = datetime.now(UTC)
    values: dict[str, Any] = {"last_login_at": now}
    if _hasher.check_needs_rehash(stored):
        values["password_hash"] = await asyncio.to_thread(_hasher.hash, password[:MAX_PASSWORD_CHARS])
    async with engine.begin() as conn:
        await conn.execute(update(s.users).where(s.users.c.id == row.id).values(**values))
    return user_from_row(row)
