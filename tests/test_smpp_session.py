"""The SMPP connector against simnet's SMSC on loopback: bind, submit, window, throttling, a lost
bind in the middle of a burst, refused binds, receipts, stop. Real TCP, no fakes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controller.sender import smpp_wire
from controller.sender.smpp import SmppConnector, SmppSettings, SmppSubmitted, source_address
from controller.submit import SubmitError
from simnet.smsc import SmscServer

ROUTE = "test-route"


def settings_for(port: int, **overrides: Any) -> SmppSettings:
    """Settings with short timers, so failures and recoveries take milliseconds."""
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "system_id": "probe",
        "password": "secret",
        "reconnect_min_s": 0.05,
        "reconnect_max_s": 0.2,
        "throttle_backoff_s": 0.01,
        "throttle_backoff_max_s": 0.1,
        "response_timeout_s": 2.0,
        "bind_timeout_s": 2.0,
    }
    values.update(overrides)
    return SmppSettings(**values)


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def connected(port: int, *, wait_bound: bool = True, **kwargs: Any) -> AsyncIterator[SmppConnector]:
    callbacks = {k: kwargs.pop(k) for k in ("on_receipt", "on_mo") if k in kwargs}
    connector = SmppConnector(ROUTE, settings_for(port, **kwargs), **callbacks)
    await connector.start()
    try:
        if wait_bound:
            await eventually(lambda: connector.health().bound)
        yield connector
    finally:
        await connector.stop()


@pytest.fixture
async def smsc() -> AsyncIterator[SmscServer]:
    async with SmscServer() as server:
        yield server


async def burst(connector: SmppConnector, count: int, prefix: str = "burst") -> list[SmppSubmitted]:
    return list(
        await asyncio.gather(
            *(
                connector.submit(source="ProbeFleet", destination="+447700900123", text=f"{prefix} {i:05d}")
                for i in range(count)
            )
        )
    )


async def test_bind_and_submit_a_short_gsm_message(smsc: SmscServer) -> None:
    async with connected(smsc.port) as connector:
        result = await connector.submit(source="ProbeFleet", destination="+447700900123", text="Hello [€]")
    assert len(smsc.submits) == 1
    seen = smsc.submits[0]
    assert seen.text == "Hello [€]"
    assert (seen.source_addr, seen.source_addr_ton, seen.source_addr_npi) == ("ProbeFleet", 5, 0)
    assert seen.destination_addr == "447700900123"
    assert (seen.data_coding, seen.esm_class, seen.registered_delivery, seen.concat) == (0, 0, 1, None)
    assert result.message_ids == (seen.message_id,)
    assert (result.parts, result.encoding) == (1, "gsm7")
    assert result.submitted_at <= result.acked_at
    assert result.submitted_at.utcoffset() is not None
    health = connector.health()
    assert (health.binds, health.submitted, health.acknowledged, health.in_flight) == (1, 1, 1, 0)
    assert health.kind == "smpp" and health.route == ROUTE


def test_source_address_types() -> None:
    settings = settings_for(1)
    assert source_address("+447700900123", settings) == (1, 1, "447700900123")
    assert source_address("12345", settings) == (3, 0, "12345")
    assert source_address("447700900123", settings) == (1, 1, "447700900123")
    assert source_address("Probe 1", settings) == (5, 0, "Probe 1")
    with pytest.raises(SubmitError) as refused:
        source_address("ABCDEFGHIJKL", settings)
    assert not refused.value.retryable
    pinned = settings_for(1, source_ton=0, source_npi=1)
    assert source_address("Probe", pinned) == (0, 1, "Probe")


async def test_a_long_ucs2_message_arrives_as_parts_in_order(smsc: SmscServer) -> None:
    text = "Проверка маршрута 😀 " * 8  # 168 UTF-16 units: three parts of at most 67
    async with connected(smsc.port) as connector:
        result = await connector.submit(source="+15551234567", destination="+447700900123", text=text)
    assert (result.parts, result.encoding) == (3, "ucs2")
    parts = smsc.submits
    assert [p.concat[1:] for p in parts if p.concat] == [(3, 1), (3, 2), (3, 3)]
    assert len({p.concat[0] for p in parts if p.concat}) == 1
    assert all(p.data_coding == 8 and p.esm_class & 0x40 for p in parts)
    assert (parts[0].source_addr, parts[0].source_addr_ton, parts[0].source_addr_npi) == ("15551234567", 1, 1)
    assert "".join(p.text for p in parts) == text
    assert result.message_ids == tuple(p.message_id for p in parts)


async def test_a_burst_never_exceeds_the_window(smsc: SmscServer) -> None:
    """A proxy between connector and SMSC counts submit_sm written and answered on the wire."""
    smsc.behaviour.response_delay_ms = 20.0
    outstanding = 0
    most = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        nonlocal outstanding, most
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(4)
                frame = header + await reader.readexactly(int.from_bytes(header, "big") - 4)
                pdu = smpp_wire.decode(frame)
                if upstream and pdu.command == "submit_sm":
                    outstanding += 1
                    most = max(most, outstanding)
                elif not upstream and pdu.command == "submit_sm_resp":
                    outstanding -= 1
                writer.write(frame)  # as it came: the codec does not re-encode what it parsed
        writer.close()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", smsc.port)
        await asyncio.gather(pipe(reader, server_writer, True), pipe(server_reader, writer, False))

    proxy = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    try:
        async with connected(port, window=64) as connector:
            results = await burst(connector, 500)
            health = connector.health()
    finally:
        proxy.close()
    assert len(results) == 500 and len(smsc.submits) == 500
    assert most == 64  # filled, never exceeded
    assert health.acknowledged == 500 and health.in_flight == 0 and health.queued == 0


async def test_throttling_pauses_and_resends_the_throttled_segment(smsc: SmscServer) -> None:
    smsc.behaviour.throttle_every = 5
    async with connected(smsc.port, max_retries=10) as connector:
        results = await burst(connector, 500)
        health = connector.health()
    assert len(results) == 500
    texts = [s.text for s in smsc.submits]
    assert len(texts) == 500 and set(texts) == {f"burst {i:05d}" for i in range(500)}  # none lost, no dupes
    assert health.throttled >= 100
    assert health.submitted == 500 + health.throttled
    assert health.errors == 0


async def test_throttled_beyond_max_retries_fails_retryable(smsc: SmscServer) -> None:
    smsc.behaviour.throttle_every = 1
    async with connected(smsc.port, max_retries=2) as connector:
        with pytest.raises(SubmitError) as failed:
            await connector.submit(source="Probe", destination="+447700900123", text="hi")
        assert failed.value.retryable and "ESME_RTHROTTLED" in failed.value.reason
        assert connector.health().throttled == 3


async def test_a_system_error_is_a_retryable_refusal(smsc: SmscServer) -> None:
    smsc.behaviour.error_every = 1
    async with connected(smsc.port) as connector:
        with pytest.raises(SubmitError) as failed:
            await connector.submit(source="Probe", destination="+447700900123", text="hi")
        assert failed.value.retryable and "ESME_RSYSERR" in failed.value.reason
        assert connector.health().errors == 1


async def test_a_bind_dropped_mid_burst_loses_nothing(smsc: SmscServer) -> None:
    smsc.behaviour.drop_after_submits = 200
    smsc.behaviour.response_delay_ms = 5.0  # submits the SMSC took but had not answered are lost with it
    async with connected(smsc.port, window=64) as connector:
        results = await burst(connector, 500)
        health = connector.health()
    assert len(results) == 500
    counts = Counter(s.text for s in smsc.submits)
    assert set(counts) == {f"burst {i:05d}" for i in range(500)}  # every text reached the SMSC
    duplicates = sum(n - 1 for n in counts.values())
    assert 0 < duplicates <= health.resent <= 64  # duplicates only from the in-flight resends
    assert health.binds == 2 and health.resent > 0


async def test_a_refused_bind_is_retried_with_back_off_until_accepted(
    smsc: SmscServer, caplog: pytest.LogCaptureFixture
) -> None:
    smsc.behaviour.refuse_bind = True
    async with connected(smsc.port, wait_bound=False) as connector:
        await eventually(lambda: connector.health().bind_failures >= 3)
        health = connector.health()
        assert not health.bound and health.binds == 0
        assert health.last_error is not None and "ESME_RBINDFAIL" in health.last_error
        refusals = [r for r in caplog.records if "bind refused" in r.getMessage()]
        assert refusals and all(getattr(r, "route", None) == ROUTE for r in refusals)
        assert len(refusals) < 20  # back-off, not a tight loop
        smsc.behaviour.refuse_bind = False
        await eventually(lambda: connector.health().bound)
        await connector.submit(source="Probe", destination="+447700900123", text="after refusal")
    assert [s.text for s in smsc.submits] == ["after refusal"]


async def test_a_wrong_password_is_reported(smsc: SmscServer) -> None:
    async with connected(smsc.port, wait_bound=False, password="wrong") as connector:
        await eventually(lambda: connector.health().bind_failures >= 1)
        assert "ESME_RINVPASWD" in (connector.health().last_error or "")


async def test_an_unanswered_submit_is_a_lost_bind(smsc: SmscServer) -> None:
    smsc.behaviour.response_delay_ms = 1000.0
    async with connected(smsc.port, response_timeout_s=0.2, max_retries=1) as connector:
        with pytest.raises(SubmitError) as failed:
            await connector.submit(source="Probe", destination="+447700900123", text="slow")
        assert failed.value.retryable
        health = connector.health()
    assert health.resent == 1 and health.binds >= 2
    assert health.last_error is not None and "unanswered" in health.last_error


async def test_receipts_reach_on_receipt_and_a_slow_callback_stalls_nothing(smsc: SmscServer) -> None:
    receipts: list[Any] = []
    hold = asyncio.Event()

    async def on_receipt(pdu: Any) -> None:
        receipts.append(pdu)
        if len(receipts) == 1:
            raise RuntimeError("a broken receipt handler")
        await hold.wait()  # never released while the test submits more

    async with connected(smsc.port, enquire_link_s=0.1, on_receipt=on_receipt) as connector:
        first = await connector.submit(source="Probe", destination="+447700900123", text="one")
        await eventually(lambda: len(receipts) == 1)
        more = await burst(connector, 20, prefix="more")
        await eventually(lambda: len(receipts) == 21)
        assert receipts[0].receipted_message_id.decode() == first.message_ids[0]
        assert {r.receipted_message_id.decode() for r in receipts[1:]} == {m.message_ids[0] for m in more}
        await asyncio.sleep(0.3)  # idle: enquire_link keeps the bind
        health = connector.health()
        assert health.receipts == 21 and health.bound and health.binds == 1
        hold.set()


async def test_stop_fails_queued_submits_as_retryable(smsc: SmscServer) -> None:
    smsc.behaviour.response_delay_ms = 200.0
    async with connected(smsc.port, window=1) as connector:
        tasks = [
            asyncio.create_task(connector.submit(source="Probe", destination="+447700900123", text=f"q{i}"))
            for i in range(5)
        ]
        await eventually(lambda: connector.health().in_flight == 1)
        assert connector.health().queued == 4
        await connector.stop()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(outcomes[0], SmppSubmitted)  # in flight: answered before the unbind
        assert all(isinstance(o, SubmitError) and o.retryable for o in outcomes[1:])
        with pytest.raises(SubmitError):
            await connector.submit(source="Probe", destination="+447700900123", text="late")
    assert [s.text for s in smsc.submits] == ["q0"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="password"):
        settings_for(1, password="ninechars")  # 9 octets with its NUL: 8 characters at most
    with pytest.raises(ValueError, match="reconnect_max_s"):
        settings_for(1, reconnect_min_s=5.0, reconnect_max_s=1.0)
    with pytest.raises(ValueError, match="extra"):
        settings_for(1, windw=3)
    assert "secret" not in repr(settings_for(1))


async def test_unbind_from_the_smsc_is_answered_and_the_connector_reconnects(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = SmscServer()
    await server.start()
    port = server.port
    async with connected(port) as connector:
        await server.stop()
        await eventually(lambda: not connector.health().bound)
        assert any("bind lost: unbound by the SMSC" in r.getMessage() for r in caplog.records)
        server = SmscServer(port=port)
        await server.start()
        try:
            await eventually(lambda: connector.health().bound)
            assert connector.health().binds == 2
        finally:
            await connector.stop()
            await server.stop()


async def test_throughput_5000_short_messages(smsc: SmscServer, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a benchmark (bench/ is), a smoke figure printed with -s."""
    smsc.behaviour.receipts = False
    async with connected(smsc.port, window=64, registered_delivery=False) as connector:
        started = time.perf_counter()
        results = await burst(connector, 5000)
        elapsed_s = time.perf_counter() - started
        health = connector.health()
    assert len(results) == 5000 and health.acknowledged == 5000
    with capsys.disabled():
        print(f"\n5,000 submits, window 64, loopback: {elapsed_s:.2f} s = {5000 / elapsed_s:,.0f} submits/s")
