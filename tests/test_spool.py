"""The durable spool on real SQLite files: order, dedupe, the size limit, durability settings,
corrupt files, and a real SIGKILL of a process in the middle of writing."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from probe_agent.spool import SCHEMA_VERSION, Spool, SpoolEntry

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "pf/v1/agents/a1/sms"


def payload_for(obs_id: str) -> bytes:
    """Binary, NUL bytes included, different per id; the SIGKILL child computes the same."""
    return hashlib.sha256(obs_id.encode()).digest() * 40 + b"\x00" + obs_id.encode()


class FakeClock:
    """A settable UTC clock, so the 7-day memory can be tested without waiting a week."""

    def __init__(self) -> None:
        self.now = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def spool_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "probe_agent.spool" and r.levelno == level]


# -- order ---------------------------------------------------------------------------------------


def test_put_pending_ack_keep_insertion_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "deep" / "dir" / "spool.db")
    ids = [f"obs-{i:04d}" for i in range(500)]
    for obs_id in ids:
        assert spool.put(obs_id, TOPIC, payload_for(obs_id))
    assert spool.depth() == 500

    # Page through with after_seq, as the uplink does while earlier pages are in flight.
    seen: list[SpoolEntry] = []
    after = 0
    while page := spool.pending(limit=64, after_seq=after):
        assert len(page) <= 64
        seen.extend(page)
        after = page[-1].seq
    assert [e.obs_id for e in seen] == ids
    assert [e.payload for e in seen] == [payload_for(i) for i in ids]
    seqs = [e.seq for e in seen]
    assert all(a < b for a, b in itertools.pairwise(seqs))
    assert all(e.topic == TOPIC and e.created_at.tzinfo is not None for e in seen)

    # Broker acks arrive out of order; only the acked entries leave, the rest keep their order.
    acked = set(seqs[::3]) | {seqs[-1]}
    for seq in sorted(acked, reverse=True):
        spool.ack(seq)
    remaining = spool.pending(limit=1000)
    assert [e.seq for e in remaining] == [s for s in seqs if s not in acked]
    assert spool.depth() == len(remaining)
    assert spool.pending(limit=5) == remaining[:5]
    spool.ack(seqs[0])  # already acked: ignored
    spool.ack(10**9)  # never existed: ignored
    assert spool.depth() == len(remaining)
    spool.close()


def test_created_at_is_the_clock_in_utc(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", clock=clock)
    spool.put("a", TOPIC, b"x")
    clock.now += timedelta(seconds=1, microseconds=7)
    spool.put("b", TOPIC, b"y")
    created = [e.created_at for e in spool.pending()]
    assert created == [clock.now - timedelta(seconds=1, microseconds=7), clock.now]
    assert all(c.utcoffset() == timedelta(0) for c in created)


def test_reopen_keeps_entries_order_and_dropped_count(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path, max_entries=40)
    for i in range(50):
        assert spool.put(f"obs-{i}", TOPIC, payload_for(f"obs-{i}"))
    before = spool.pending(limit=100)
    newest = before[-1]
    spool.ack(newest.seq)  # ack the newest: its seq must never be handed out again
    spool.ack(before[0].seq)
    expected = spool.pending(limit=100)
    assert spool.dropped() == 10
    spool.close()

    spool = Spool(path, max_entries=40)
    assert spool.pending(limit=100) == expected  # seq, id, topic, payload and created_at
    assert spool.depth() == 38
    assert spool.dropped() == 10
    assert not spool.put(newest.obs_id, TOPIC, b"re-read after restart")  # ack memory survived
    assert spool.put("obs-new", TOPIC, b"new")
    assert spool.pending(limit=100)[-1].seq > newest.seq
    spool.close()


def test_closed_spool_refuses_calls(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool.db") as spool:
        spool.put("a", TOPIC, b"x")
    spool.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        spool.put("b", TOPIC, b"y")
    with pytest.raises(RuntimeError, match="closed"):
        spool.depth()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_entries"):
        Spool(tmp_path / "a.db", max_entries=0)
    spool = Spool(tmp_path / "b.db")
    with pytest.raises(ValueError, match="limit"):
        spool.pending(limit=-1)  # SQLite would read LIMIT -1 as "no limit"
    with pytest.raises(ValueError, match="obs_id"):
        spool.put("", TOPIC, b"x")
    assert spool.pending(limit=0) == []
    assert spool.depth() == 0


# -- dedupe --------------------------------------------------------------------------------------


def test_duplicate_id_refused_while_spooled_and_after_ack(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    assert spool.put("sms-1", TOPIC, b"first")
    assert not spool.put("sms-1", TOPIC, b"second")
    [entry] = spool.pending()
    assert entry.payload == b"first"  # the duplicate did not overwrite the original
    assert spool.depth() == 1

    spool.ack(entry.seq)
    assert spool.depth() == 0
    assert not spool.put("sms-1", TOPIC, b"re-read after a crash")
    assert spool.depth() == 0
    assert spool.put("sms-2", TOPIC, b"another")
    assert [e.obs_id for e in spool.pending()] == ["sms-2"]


def test_sent_memory_is_bounded_by_count(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", sent_memory_max=3)
    for obs_id in "abcd":
        spool.put(obs_id, TOPIC, b"x")
        spool.ack(spool.pending()[0].seq)
    assert spool.put("a", TOPIC, b"x")  # the oldest of four acks is forgotten
    for obs_id in "bcd":
        assert not spool.put(obs_id, TOPIC, b"x")
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM sent").fetchone()[0] == 3


def test_sent_memory_is_bounded_by_age(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", clock=clock)
    spool.put("old", TOPIC, b"x")
    spool.ack(spool.pending()[0].seq)
    clock.now += timedelta(days=7) - timedelta(seconds=1)
    assert not spool.put("old", TOPIC, b"x")
    clock.now += timedelta(seconds=2)
    assert spool.put("old", TOPIC, b"x")  # older than 7 days: forgotten even before the next ack

    # And pruned from the file on the next ack.
    spool.put("other", TOPIC, b"x")
    for entry in spool.pending():
        spool.ack(entry.seq)
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM sent").fetchone()[0] == 2  # the new acks only
    clock.now += timedelta(days=8)
    spool.put("third", TOPIC, b"x")
    spool.ack(spool.pending()[0].seq)
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert [r[0] for r in db.execute("SELECT obs_id FROM sent")] == ["third"]


# -- size limit ----------------------------------------------------------------------------------


def test_size_limit_drops_oldest_counts_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool.db", max_entries=5)
    for i in range(8):
        assert spool.put(f"obs-{i}", TOPIC, payload_for(f"obs-{i}"))
    assert spool.depth() == 5
    assert spool.dropped() == 3
    assert [e.obs_id for e in spool.pending()] == [f"obs-{i}" for i in range(3, 8)]

    warnings = spool_records(caplog, logging.WARNING)
    assert len(warnings) == 3  # one per put that overflowed
    text = "\n".join(r.getMessage() for r in warnings)
    for i in range(3):
        assert f"obs-{i}" in text
    assert "dropped the 1 oldest" in warnings[0].getMessage()
    assert "(3 dropped in total)" in warnings[-1].getMessage()
    assert not any("obs-3" in r.getMessage() for r in warnings)


def test_lowered_limit_on_reopen_drops_and_names_every_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    ids = [f"obs-{i:03d}" for i in range(251)]
    for obs_id in ids:
        spool.put(obs_id, TOPIC, b"x")
    spool.close()
    assert not spool_records(caplog, logging.WARNING)

    spool = Spool(path, max_entries=1)
    assert spool.depth() == 1
    assert spool.dropped() == 250
    assert [e.obs_id for e in spool.pending()] == ids[-1:]
    warnings = spool_records(caplog, logging.WARNING)
    assert "dropped the 250 oldest" in warnings[0].getMessage()
    named = ", ".join(r.getMessage().rsplit(": ", 1)[1] for r in warnings).split(", ")
    assert named == ids[:-1]


# -- durability settings -------------------------------------------------------------------------


def test_wal_full_sync_and_schema_version_are_set(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.put("a", TOPIC, b"x")
    # synchronous is per connection, so it has to be read on the spool's own one.
    assert spool._conn is not None
    assert spool._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert spool._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with sqlite3.connect(path) as db:  # WAL is recorded in the file itself
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    spool.close()


# -- corrupt files -------------------------------------------------------------------------------


def assert_moved_aside(path: Path, caplog: pytest.LogCaptureFixture) -> Path:
    """Exactly one ``<name>.corrupt-<UTC stamp>`` beside ``path``, and an ERROR naming both."""
    pattern = re.compile(re.escape(path.name) + r"\.corrupt-(\d{8}T\d{6}Z)")
    [match] = [m for p in path.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    aside = path.parent / match[0]
    stamp = datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs(stamp - datetime.now(UTC)) < timedelta(minutes=1)  # the time of the move, in UTC
    [error] = spool_records(caplog, logging.ERROR)
    assert str(path) in error.getMessage()
    assert str(aside) in error.getMessage()
    assert error.exc_info is None
    return aside


def test_file_that_is_not_a_database_is_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    garbage = b"this is not a database, it is a text file that happens to sit here\n" * 20
    path.write_bytes(garbage)
    Path(f"{path}-wal").write_bytes(b"stale write-ahead log")

    spool = Spool(path)
    aside = assert_moved_aside(path, caplog)
    assert aside.read_bytes() == garbage  # kept as it was, for a post-mortem
    # SQLite may discard a WAL without a valid header; what must not happen is the fresh
    # spool starting on top of it.
    assert Path(f"{path}-wal").read_bytes() != b"stale write-ahead log"
    assert spool.depth() == 0
    assert spool.put("a", TOPIC, b"payload")
    assert [e.payload for e in spool.pending()] == [b"payload"]
    spool.close()
    assert [e.obs_id for e in Spool(path).pending()] == ["a"]


def test_damaged_pages_are_detected_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    for i in range(200):
        spool.put(f"obs-{i}", TOPIC, payload_for(f"obs-{i}"))
    spool.close()
    with path.open("r+b") as f:  # keep the header valid, scribble over the b-tree pages
        f.seek(4096 * 2)
        f.write(b"\xab" * 4096 * 3)

    spool = Spool(path)
    assert_moved_aside(path, caplog)
    assert spool.depth() == 0
    assert spool.put("obs-0", TOPIC, b"fresh")
    assert spool.pending()[0].payload == b"fresh"


def test_corruption_found_while_running_is_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    for i in range(300):
        spool.put(f"obs-{i}", TOPIC, bytes(2000))
    spool.close()
    spool = Spool(path)
    assert spool._conn is not None
    spool._conn.execute("PRAGMA cache_size=1")  # so reads go to the damaged file, not the cache
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xab" * (path.stat().st_size - 4096))

    assert spool.pending(limit=1000) == []  # the agent keeps running on a fresh file
    assert_moved_aside(path, caplog)
    assert spool.put("after", TOPIC, b"x")
    assert [e.obs_id for e in spool.pending()] == ["after"]


def test_newer_schema_is_moved_aside_with_its_wal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    Spool(path).close()
    # Another connection (a newer agent, say) keeps the file open, so its WAL stays on disk.
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    try:
        spool = Spool(path)
    finally:
        db.close()
    aside = assert_moved_aside(path, caplog)
    assert "newer" in spool_records(caplog, logging.ERROR)[0].getMessage()
    assert Path(f"{aside}-wal").exists()  # moved with the file, so the pair still opens
    with sqlite3.connect(aside) as old:
        assert old.execute("SELECT version FROM schema_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert spool.put("a", TOPIC, b"x")
    assert spool.depth() == 1


# -- concurrency and crashes ---------------------------------------------------------------------


def test_threads_share_one_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    acked: list[str] = []
    stop = threading.Event()

    def writer(n: int) -> list[bool]:
        return [spool.put(f"w{n}-{i}", TOPIC, payload_for(f"w{n}-{i}")) for i in range(100)]

    def acker() -> None:
        while not stop.is_set():
            for entry in spool.pending(limit=10):
                spool.ack(entry.seq)
                acked.append(entry.obs_id)

    ack_thread = threading.Thread(target=acker)
    ack_thread.start()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(writer, range(4)))
    stop.set()
    ack_thread.join()

    assert all(all(r) for r in results)
    rest = spool.pending(limit=1000)
    assert acked, "the acker never saw an entry"
    # Every id exactly once: either acked (once) or still waiting, none lost or doubled.
    assert sorted(acked + [e.obs_id for e in rest]) == sorted(
        f"w{n}-{i}" for n in range(4) for i in range(100)
    )
    assert spool.depth() == len(rest)
    assert all(e.payload == payload_for(e.obs_id) for e in rest)


CHILD = """
import hashlib, sys
from probe_agent.spool import Spool

def payload_for(obs_id):
    return hashlib.sha256(obs_id.encode()).digest() * 40 + b"\\x00" + obs_id.encode()

spool = Spool(sys.argv[1])
prefix = sys.argv[2]
i = 0
while True:
    obs_id = f"{prefix}{i:06d}"
    if spool.put(obs_id, "pf/v1/agents/a1/sms", payload_for(obs_id)):
        sys.stdout.write(obs_id + "\\n")
        sys.stdout.flush()
    i += 1
"""


def run_and_kill(path: Path, prefix: str, lines_before_kill: int) -> list[str]:
    """Start a writer, SIGKILL it after it reported ``lines_before_kill`` puts; all ids it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), prefix],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    printed: list[str] = []
    try:
        while len(printed) < lines_before_kill:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"writer exited early: {child.wait()} {child.communicate()[1]}")
            printed.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)  # lines already in the pipe were durable too
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return printed + out.split()


def test_sigkill_loses_nothing_that_put_confirmed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    printed: list[str] = []
    # Three lives: each writer reopens the file the previous one was killed on.
    for life, count in enumerate((300, 250, 400)):
        confirmed = run_and_kill(path, f"life{life}-", count)
        assert len(confirmed) >= count
        printed.extend(confirmed)

    spool = Spool(path)
    entries = spool.pending(limit=100_000)
    ids = [e.obs_id for e in entries]
    # Everything confirmed is there, in order; at most one unconfirmed put per life on top.
    positions = {obs_id: n for n, obs_id in enumerate(ids)}
    assert all(obs_id in positions for obs_id in printed), "a confirmed observation was lost"
    assert [positions[i] for i in printed] == sorted(positions[i] for i in printed)
    # Beyond the confirmed ones only whole, later puts of the same writer (their confirmation was
    # cut by the kill): each life's ids are one gap-free run from its first put.
    for life in range(3):
        numbers = [int(i.split("-")[1]) for i in ids if i.startswith(f"life{life}-")]
        assert numbers == list(range(len(numbers)))
    for entry in entries:
        assert entry.payload == payload_for(entry.obs_id)
        assert entry.topic == TOPIC
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs))
    assert spool.depth() == len(entries)
    assert not spool_records(caplog, logging.ERROR)  # never taken for corrupt
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert spool.put("after-the-crashes", TOPIC, b"x")
