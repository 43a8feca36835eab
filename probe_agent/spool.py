"""The agent's durable outbox: every observation is written here before it is published.

An observation enters the spool with ``put`` (committed and fsynced when it returns), the uplink
publishes what ``pending`` returns with MQTT QoS 1, and ``ack`` removes an entry only once the
broker has acknowledged it. So nothing is lost when the broker or the network is down, when the
agent is killed, or when the Pi loses power: after a restart the rest is replayed in order.

The store is one SQLite file (stdlib ``sqlite3``) in WAL mode with ``synchronous=FULL``, which
makes a commit durable across power loss, not only across a crash of the process. Observations
carry a stable id; ``put`` refuses an id that is already spooled or was acknowledged recently, so
a message re-read from the SIM after a crash is not sent twice (the controller still removes
duplicates, since QoS 1 is at-least-once). When the spool holds more than its limit it drops the
oldest entries, counts them persistently and logs a warning naming them: never silently.

A file that is not a database, or a corrupt one, is moved aside (kept for a post-mortem) and a
fresh spool is started, because an agent that stops receiving is worse than one that lost its
backlog.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from probe_agent.clock import utc_now

log = logging.getLogger(__name__)

#: The version of the tables below; a file with a newer one (after a downgrade) is moved aside.
SCHEMA_VERSION = 1
#: Acknowledged ids remembered to refuse a re-read of the same SMS: at most this many ...
SENT_MEMORY_MAX = 10_000
#: ... and none older than this (whichever is less). A re-read happens within minutes of a crash.
SENT_MEMORY_AGE = timedelta(days=7)
#: Dropped ids are logged in lines of this many, so a large drop stays readable.
_IDS_PER_LOG_LINE = 100
#: How long a writer waits for another connection's lock (a diagnostic tool reading the file).
_BUSY_TIMEOUT_S = 5.0
#: SQLite result codes that mean the file itself is damaged, not that the operation failed.
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
-- AUTOINCREMENT: a seq is never reused, even after the newest entry was acked and the file reopened.
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    obs_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_us INTEGER NOT NULL
);
-- Acknowledged ids, oldest first by n; pruned by count and by age on every ack.
CREATE TABLE IF NOT EXISTS sent (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    obs_id TEXT NOT NULL UNIQUE,
    acked_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_by_age ON sent (acked_us);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters (name, value) VALUES ('depth', 0), ('dropped', 0);
-- COUNT(*) walks the whole table; the depth is kept by triggers in the same transaction instead.
CREATE TRIGGER IF NOT EXISTS outbox_depth_in AFTER INSERT ON outbox
BEGIN UPDATE counters SET value = value + 1 WHERE name = 'depth'; END;
CREATE TRIGGER IF NOT EXISTS outbox_depth_out AFTER DELETE ON outbox
BEGIN UPDATE counters SET value = value - 1 WHERE name = 'depth'; END;
"""

_T = TypeVar("_T")


@dataclass(frozen=True)
class SpoolEntry:
    """One spooled observation, as ``pending`` returns it."""

    seq: int  # insertion order, strictly increasing, never reused
    obs_id: str
    topic: str
    payload: bytes
    created_at: datetime  # UTC, tz-aware


class _Unusable(Exception):
    """The file cannot serve as a spool; the message says why."""


def _utc_now() -> datetime:
    return utc_now()


def _to_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CORRUPTION_CODES


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, taken at once so two writers never deadlock on lock upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        # The original error matters more than a failed rollback.
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Spool:
    """A durable, thread-safe FIFO of observations waiting for the broker's acknowledgement."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_entries: int = 100_000,
        *,
        sent_memory_max: int = SENT_MEMORY_MAX,
        sent_memory_age: timedelta = SENT_MEMORY_AGE,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """Open (or create, with its parent directories) the spool at ``path``.

        ``max_entries`` bounds the backlog; ``sent_memory_max`` and ``sent_memory_age`` bound the
        memory of acknowledged ids; ``clock`` returns the tz-aware current time (tests shift it).
        A file that is not a database, is corrupt or has a newer schema is moved aside.
        """
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, not {max_entries}")
        if sent_memory_max < 0:
            raise ValueError(f"sent_memory_max must not be negative, not {sent_memory_max}")
        self._path = Path(path)
        self._max_entries = max_entries
        self._sent_max = sent_memory_max
        self._sent_age = sent_memory_age
        self._clock = clock
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = self._open()
        # A limit lowered in the config applies at once, not only at the next put.
        with self._lock:
            dropped_ids, total = self._call(self._enforce_limit_tx)
        self._log_dropped(dropped_ids, total)

    @property
    def path(self) -> Path:
        """Where the spool file lives."""
        return self._path

    # -- public operations -------------------------------------------------------------------

    def put(self, obs_id: str, topic: str, payload: bytes) -> bool:
        """Store an observation; when this returns True it is on disk (fsynced).

        Returns False, storing nothing, when ``obs_id`` is already spooled or was acknowledged
        within the sent-id memory. Past ``max_entries``, the oldest entries are dropped,
        counted and logged as a warning.
        """
        return self.put_many([(obs_id, topic, payload)])[0]

    def put_many(self, entries: list[tuple[str, str, bytes]]) -> list[bool]:
        """``put`` for several observations in one transaction (one fsync); a flag for each."""
        if any(not obs_id for obs_id, _, _ in entries):
            raise ValueError("obs_id must not be empty")

        def op(conn: sqlite3.Connection) -> tuple[list[bool], list[str], int]:
            now = self._clock()
            stored: list[bool] = []
            with _transaction(conn):
                for obs_id, topic, payload in entries:
                    seen = conn.execute(
                        "SELECT 1 FROM sent WHERE obs_id = ? AND acked_us >= ?",
                        (obs_id, _to_us(now - self._sent_age)),
                    ).fetchone()
                    if seen is not None:
                        stored.append(False)
                        continue
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO outbox (obs_id, topic, payload, created_us)"
                        " VALUES (?, ?, ?, ?)",
                        (obs_id, topic, bytes(payload), _to_us(now)),
                    )
                    stored.append(cur.rowcount > 0)
                dropped_ids, total = self._enforce_limit(conn) if any(stored) else ([], 0)
            return stored, dropped_ids, total

        if not entries:
            return []
        with self._lock:
            stored, dropped_ids, total = self._call(op)
        for (obs_id, _, _), ok in zip(entries, stored, strict=True):
            if not ok:
                log.debug("spool refused duplicate observation %s", obs_id)
        self._log_dropped(dropped_ids, total)
        return stored

    def pending(self, limit: int = 100, after_seq: int = 0) -> list[SpoolEntry]:
        """Up to ``limit`` entries with ``seq > after_seq``, oldest first."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")

        def op(conn: sqlite3.Connection) -> list[SpoolEntry]:
            rows = conn.execute(
                "SELECT seq, obs_id, topic, payload, created_us FROM outbox"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
            return [
                SpoolEntry(int(seq), str(obs_id), str(topic), bytes(payload), _from_us(int(created_us)))
                for seq, obs_id, topic, payload, created_us in rows
            ]

        with self._lock:
            return self._call(op)

    def ack(self, seq: int) -> None:
        """Remove entry ``seq`` (the broker has it) and remember its id as sent.

        An unknown ``seq`` (acked twice, or dropped while in flight) is ignored.
        """
        self.ack_many([seq])

    def ack_many(self, seqs: list[int]) -> None:
        """``ack`` for several entries in one transaction (one fsync)."""

        def op(conn: sqlite3.Connection) -> list[int]:
            now_us = _to_us(self._clock())
            unknown: list[int] = []
            with _transaction(conn):
                last = 0
                for seq in seqs:
                    row = conn.execute("SELECT obs_id FROM outbox WHERE seq = ?", (seq,)).fetchone()
                    if row is None:
                        unknown.append(seq)
                        continue
                    conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                    cur = conn.execute(
                        "INSERT OR REPLACE INTO sent (obs_id, acked_us) VALUES (?, ?)", (str(row[0]), now_us)
                    )
                    last = int(cur.lastrowid or 0)
                if last:
                    # n only grows, so "the last N acks" is a range on the primary key: no scan.
                    conn.execute("DELETE FROM sent WHERE n <= ?", (last - self._sent_max,))
                    conn.execute(
                        "DELETE FROM sent WHERE acked_us < ?",
                        (now_us - self._sent_age // timedelta(microseconds=1),),
                    )
            return unknown

        if not seqs:
            return
        with self._lock:
            unknown = self._call(op)
        for seq in unknown:
            log.debug("spool ack for unknown seq %d ignored", seq)

    def depth(self) -> int:
        """How many observations wait for the broker."""
        with self._lock:
            return self._call(lambda conn: self._counter(conn, "depth"))

    def dropped(self) -> int:
        """How many observations were dropped for the size limit, ever (kept across reopen)."""
        with self._lock:
            return self._call(lambda conn: self._counter(conn, "dropped"))

    def close(self) -> None:
        """Close the file; further calls raise. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _counter(conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def _enforce_limit(self, conn: sqlite3.Connection) -> tuple[list[str], int]:
        """Inside a transaction: drop the oldest entries beyond the limit and count them."""
        excess = self._counter(conn, "depth") - self._max_entries
        if excess <= 0:
            return [], 0
        rows = conn.execute("SELECT seq, obs_id FROM outbox ORDER BY seq LIMIT ?", (excess,)).fetchall()
        conn.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
        conn.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (len(rows),))
        return [str(obs_id) for _, obs_id in rows], self._counter(conn, "dropped")

    def _enforce_limit_tx(self, conn: sqlite3.Connection) -> tuple[list[str], int]:
        with _transaction(conn):
            return self._enforce_limit(conn)

    def _log_dropped(self, obs_ids: list[str], total: int) -> None:
        if not obs_ids:
            return
        log.warning(
            "spool %s over its limit of %d: dropped the %d oldest observations (%d dropped in total): %s",
            self._path,
            self._max_entries,
            len(obs_ids),
            total,
            ", ".join(obs_ids[:_IDS_PER_LOG_LINE]),
        )
        for start in range(_IDS_PER_LOG_LINE, len(obs_ids), _IDS_PER_LOG_LINE):
            chunk = obs_ids[start : start + _IDS_PER_LOG_LINE]
            log.warning("spool %s dropped observations (continued): %s", self._path, ", ".join(chunk))

    def _call(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``op`` (the lock held); a file found corrupt meanwhile is replaced and ``op`` retried."""
        if self._conn is None:
            raise RuntimeError(f"spool {self._path} is closed")
        try:
            return op(self._conn)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._conn.close()
            self._conn = None
            self._move_aside(str(exc))
            self._conn = self._connect()
            return op(self._conn)

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except _Unusable as exc:
            self._move_aside(str(exc))
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        """Open the file, check it, set durability and create or check the schema."""
        conn = sqlite3.connect(
            self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise _Unusable("integrity check failed: " + "; ".join(problems[:5]))
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            if mode.lower() != "wal":
                log.warning("spool %s: WAL is not available here, journal mode is %s", self._path, mode)
            # Per connection, not stored in the file: FULL fsyncs the WAL at every commit.
            conn.execute("PRAGMA synchronous=FULL")
            self._ensure_schema(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            if _is_corruption(exc):
                raise _Unusable(str(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _ensure_schema(conn: sqlite3.Connection) -> None:
        has_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        if has_table is not None:
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            if version is not None and int(version) > SCHEMA_VERSION:
                raise _Unusable(f"schema version {version} is newer than this agent's {SCHEMA_VERSION}")
            if version == SCHEMA_VERSION:
                return
        # executescript commits first and runs in autocommit, so the script carries its own
        # transaction: a crash while creating leaves nothing half made.
        try:
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} DELETE FROM schema_version;"
                f" INSERT INTO schema_version (version) VALUES ({SCHEMA_VERSION}); COMMIT;"
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _move_aside(self, reason: str) -> None:
        """Rename the unusable file (and its WAL and shared-memory files) out of the way."""
        stamp = self._clock().astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            aside = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self._path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            side = Path(f"{self._path}{suffix}")
            if side.exists():
                # Named after the aside file, so sqlite3 opens the pair together for a post-mortem.
                os.replace(side, Path(f"{aside}{suffix}"))
        log.error(
            "spool %s is unusable (%s): moved it aside to %s and started a fresh spool; its entries are lost",
            self._path,
            reason,
            aside,
        )
