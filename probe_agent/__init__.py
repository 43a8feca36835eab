"""The probe agent that runs on each Raspberry Pi: modem port, receive, (later) spool and uplink."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("probe-fleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
