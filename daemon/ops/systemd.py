"""systemd's notify protocol (``Type=notify``): readiness, status, reload and the watchdog. A no-op outside systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def sd_notify(message: str) -> None:
    """Send ``message`` to systemd's notify socket, if there is one. Abstract socket names start with '@'."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


def watchdog_interval(env: Mapping[str, str], pid: int, default_s: float = 2.0) -> float:
    """Seconds between ``WATCHDOG=1``: half of systemd's ``WATCHDOG_USEC`` when it is meant for this process
    (``WATCHDOG_PID`` unset or ``pid``), else ``default_s``."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return default_s
    if usec <= 0 or env.get("WATCHDOG_PID", str(pid)) != str(pid):
        return default_s
    return usec / 2e6


def reloading() -> None:
    # MONOTONIC_USEC: systemd ≥ 253 matches it against the reload it asked for (ignored before)
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


class Watchdog:
    """``WATCHDOG=1`` at most every ``every_s`` seconds, and only when the caller says the loop made progress."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = 0.0

    def progress(self, now: float) -> None:
        if now - self.last >= self.every_s:
            self.last = now
            sd_notify("WATCHDOG=1")
