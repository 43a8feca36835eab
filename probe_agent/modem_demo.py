"""The modem-layer demo: one virtual modem, the agent's modem port on it, each SMS printed.

Until the full demo lands (simnet, controller, agents over MQTT), ``make demo`` runs this: it
shows the physical layer working end to end through the real python-gsmmodem-new library on a
real pseudo-terminal, with the arrival-time error of every message against the virtual modem.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal

from hardware.virtual_modem import VirtualModem
from probe_agent.modem import ModemPort

SAMPLES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("+447700900123", "Your code is 483920. Valid 5 min. #t:a1b2", {}),
    ("MyBank", "Kurs €/$: [1.08] {ok} ~ ^ \\ | §", {}),
    ("+4915112345678", "Grüße aus Köln 😀 ✓", {}),
    ("Alerts", "A long message that needs several parts. " * 6, {"ref_bits": 16}),
    ("+33612345678", "Flash: shown at once, not stored", {"flash": True}),
)


async def run(profile: str, count: int | None, interval_s: float) -> int:
    """Deliver sample SMS into a virtual modem and print what the modem port yields."""
    modem = VirtualModem(profile).start()
    port = ModemPort(modem.port, profile=None if profile == "generic" else profile)
    print(
        f"probe-fleet modem-layer demo (not yet the full system): virtual {modem.profile.name} "
        f"modem on {modem.port}, read by python-gsmmodem-new through the agent's ModemPort",
        flush=True,
    )
    await port.start()
    if not await port.wait_connected(15):
        print("modem did not come up:", (await port.state()).last_error)
        return 1
    state = await port.state()
    print(
        f"connected: {state.manufacturer} {state.model}, IMSI {state.imsi}, {state.operator} "
        f"({state.mcc_mnc}), signal {state.signal_dbm} dBm, storage {state.storage_memory} "
        f"{state.storage_used}/{state.storage_total}. Ctrl-C stops.",
        flush=True,
    )
    urc_ns: dict[str, int] = {}

    async def feed() -> None:
        for n in itertools.count():
            if count is not None and n >= count:
                return
            sender, text, extra = SAMPLES[n % len(SAMPLES)]
            d = await asyncio.to_thread(modem.deliver, sender, text, **extra)  # type: ignore[arg-type]
            if d.urc_ns:
                urc_ns[d.pdus[0]] = d.urc_ns
            await asyncio.sleep(interval_s)

    feeder = asyncio.create_task(feed())
    seen = 0
    try:
        async for sms in port.received():
            seen += 1
            err = ""
            if sms.pdus and sms.pdus[0] in urc_ns:
                err_ms = (sms.arrived_at.timestamp() * 1e9 - urc_ns[sms.pdus[0]]) / 1e6
                err = f", arrival stamp error {err_ms:+.3f} ms"
            print(
                f"[{sms.arrived_at.isoformat(timespec='milliseconds')}] from {sms.sender} "
                f"({sms.sender_type}) via SMSC {sms.smsc}, {sms.parts}/{sms.total_parts} part(s), "
                f"{sms.alphabet}{', flash' if sms.flash else ''}{err}\n    {sms.text}",
                flush=True,
            )
            if count is not None and seen >= count:
                break
    finally:
        feeder.cancel()
        await port.stop()
        modem.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point of the modem-layer demo."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="sim800l", help="virtual modem model")
    parser.add_argument("--count", type=int, help="stop after this many messages")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between messages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    loop = asyncio.new_event_loop()
    task = loop.create_task(run(args.profile, args.count, args.interval))
    loop.add_signal_handler(signal.SIGINT, task.cancel)
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("stopped", flush=True)
        return 0
    finally:
        loop.close()


if __name__ == "__main__":
    raise SystemExit(main())
