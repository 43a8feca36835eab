"""Profiles of real modem models for the virtual modem: identity, banners, noise, storage, quirks.

Each quirk is taken from the model's AT manual; ``hardware/README.md`` names the manual and
section behind each one. A profile is data only: the virtual modem reads it, nothing else does.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModemProfile:
    """How one modem model answers and what it says unasked."""

    name: str
    manufacturer: str
    model: str
    revision: str
    #: Lines of ``ATI`` before the final OK.
    ati: tuple[str, ...]
    #: Unsolicited lines after power-on or a reboot, in order.
    banner: tuple[str, ...]
    #: Unsolicited lines a modem emits now and then (signal, mode) that carry no SMS.
    noise: tuple[str, ...] = ()
    #: Storages offered by ``AT+CPMS=?`` for mem1, mem2 and mem3.
    storages: tuple[str, ...] = ("SM", "ME")
    #: Capacity of each storage in messages.
    capacity: dict[str, int] = field(default_factory=lambda: {"SM": 30, "ME": 100})
    #: The command that reads the ICCID, and the prefix of its answer ("" for a bare number).
    iccid_command: str = "+CCID"
    iccid_prefix: str = "+CCID: "
    #: Final result for an unknown command.
    unsupported: str = "ERROR"
    #: Whether ``AT+CLAC`` lists commands (else it is an unknown command).
    has_clac: bool = True
    #: Line sent when received-message storage is full, if the model sends one.
    storage_full_urc: str | None = None
    #: Access technology reported in ``+COPS?`` (0 GSM, 2 UTRAN, 7 E-UTRAN); None omits it.
    access_technology: int | None = 7
    #: Command that must be sent before the model reports full storage, if it needs one.
    storage_full_urc_enable: str | None = None
    #: Answer of ``AT+CMGR`` on an empty index: a ``+CMS ERROR`` code, or None for a bare OK.
    empty_read_error: int | None = 321
    #: Index of the first storage slot (Huawei counts from 0).
    first_index: int = 1
    #: Raw bytes the model writes on power-on before its first line (SIM800's sync bytes).
    boot_bytes: bytes = b""


GENERIC = ModemProfile(
    name="generic",
    manufacturer="probe-fleet",
    model="Virtual GSM modem",
    revision="1.0",
    ati=("probe-fleet Virtual GSM modem", "Revision: 1.0"),
    banner=(),
)

SIM800L = ModemProfile(
    name="sim800l",
    manufacturer="SIMCOM_Ltd",
    model="SIMCOM_SIM800L",
    revision="Revision:1418B05SIM800L24",
    ati=("SIM800 R14.18",),
    banner=("RDY", "+CFUN: 1", "+CPIN: READY", "Call Ready", "SMS Ready"),
    storages=("SM", "ME", "SM_P", "ME_P", "MT"),
    capacity={"SM": 50, "ME": 50, "SM_P": 50, "ME_P": 50, "MT": 100},
    iccid_command="+CCID",
    iccid_prefix="",
    has_clac=False,
    storage_full_urc=None,
    access_technology=None,
    empty_read_error=None,
    boot_bytes=b"\x00IIII\xff\xff\xff\xff",
)

EC25 = ModemProfile(
    name="ec25",
    manufacturer="Quectel",
    model="EC25",
    revision="EC25EFAR02A09M4G",
    ati=("Quectel", "EC25", "Revision: EC25EFAR02A09M4G"),
    banner=("RDY", "+CFUN: 1", "+CPIN: READY", "+QUSIM: 1", "+QIND: SMS DONE", "+QIND: PB DONE"),
    storages=("SM", "ME", "MT"),
    capacity={"SM": 50, "ME": 255, "MT": 305},
    iccid_command="+QCCID",
    iccid_prefix="+QCCID: ",
    storage_full_urc='+QIND: "smsfull","SM"',
    storage_full_urc_enable='+QINDCFG="smsfull",1',
)

E3372 = ModemProfile(
    name="e3372",
    manufacturer="huawei",
    model="E3372",
    revision="21.200.07.00.00",
    ati=(
        "Manufacturer: huawei",
        "Model: E3372",
        "Revision: 21.200.07.00.00",
        "IMEI: 867000000000000",
        "+GCAP: +CGSM,+DS,+ES",
    ),
    # Huawei writes no space after the colon in its own URCs.
    banner=("^SIMST:1", "^SRVST:2", "^MODE:7,9", "^RSSI:20", '^HCSQ:"LTE",48,35,86,14'),
    noise=("^RSSI:20", '^HCSQ:"LTE",48,35,86,14', "^MODE:7,9"),
    storages=("SM", "ME"),
    capacity={"SM": 50, "ME": 100},
    iccid_command="^ICCID",
    iccid_prefix="^ICCID: ",
    has_clac=False,
    storage_full_urc='^SMMEMFULL:"SM"',
    first_index=0,
)

PROFILES: dict[str, ModemProfile] = {p.name: p for p in (GENERIC, SIM800L, EC25, E3372)}


def get_profile(name: str) -> ModemProfile:
    """The profile called ``name``; a ValueError lists the known ones."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown modem profile {name!r}; known: {', '.join(PROFILES)}") from None
