"""Ansible filter ``mosquitto_passwd``: one line's hash for mosquitto's password file, reproducibly.

``mosquitto_passwd`` salts every hash with random bytes, so a password file written with it changes
on every run and a play that writes it is never idempotent. This filter makes the same hash format
mosquitto 2.0 writes and reads (``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``), with
the salt derived from the user name and a secret kept in the vault (HMAC-SHA256): the same password
gives the same line on every run, a changed password a changed line, and two brokers (or two fleets)
with different secrets never share a salt, so precomputed tables are no better than without one.

    {{ password | mosquitto_passwd(user, broker_passwd_salt_secret) }}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable

#: What mosquitto_passwd 2.0 uses: a 12-byte salt and 101 rounds of PBKDF2 over SHA-512 (64 bytes).
#: mosquitto reads the rounds from each line, so more are possible; every connect pays for them in
#: the broker's single thread (see broker_passwd_iterations in the role's defaults).
SALT_BYTES = 12
DEFAULT_ITERATIONS = 101
#: Keeps this HMAC's output apart from any other use of the same secret.
SALT_CONTEXT = b"probe-fleet mosquitto salt\x00"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def salt_for(username: str, salt_secret: str) -> bytes:
    """The salt of one user: the same on every run for one secret, unrelated across secrets."""
    digest = hmac.new(salt_secret.encode(), SALT_CONTEXT + username.encode(), hashlib.sha256).digest()
    return digest[:SALT_BYTES]


def mosquitto_passwd(
    password: str, username: str, salt_secret: str, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """The hash part of ``username:<hash>`` for mosquitto's ``password_file``.

    Raises ValueError for an empty password or secret, a user name mosquitto cannot store (empty,
    or with a colon or a line break), or fewer than one iteration.
    """
    if not isinstance(password, str) or not password:
        raise ValueError("mosquitto_passwd: the password is empty or not a string")
    if not username or any(c in username for c in ":\r\n"):
        raise ValueError(f"mosquitto_passwd: {username!r} cannot be a user name in a mosquitto password file")
    if not salt_secret:
        raise ValueError("mosquitto_passwd: the salt secret is empty")
    rounds = int(iterations)
    if rounds < 1:
        raise ValueError(f"mosquitto_passwd: iterations must be at least 1, not {iterations!r}")
    salt = salt_for(str(username), str(salt_secret))
    digest = hashlib.pbkdf2_hmac("sha512", str(password).encode(), salt, rounds)
    return f"$7${rounds}${_b64(salt)}${_b64(digest)}"


class FilterModule:
    """The role's filters, as Ansible loads them from ``filter_plugins/``."""

    def filters(self) -> dict[str, Callable[..., str]]:
        return {"mosquitto_passwd": mosquitto_passwd}
