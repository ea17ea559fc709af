"""Crash points for the fault-injection suite (tests/test_faults.py), off unless the environment asks.

``WINGBEAT_CRASH_AT=POINT[,POINT…]`` makes the process SIGKILL itself when it reaches ``crash_point(POINT)``: no
clean-up, no flush, as a power cut or the OOM killer would. ``WINGBEAT_CRASH_MARKER=PREFIX`` makes each point crash
once across processes (a marker file ``PREFIX.POINT`` is written first), so a restart with the same environment
goes on to the next point.
Points: before_commit, after_commit, mid_publish, swap (daemon); trainer_epoch, trainer_write (trainer).
"""

from __future__ import annotations

import os
import signal

_AT = frozenset(p for p in os.environ.get("WINGBEAT_CRASH_AT", "").split(",") if p)
_MARKER = os.environ.get("WINGBEAT_CRASH_MARKER", "")


def crash_point(name: str) -> None:
    if name not in _AT:
        return
    if _MARKER:
        try:
            fd = os.open(f"{_MARKER}.{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins
        except FileExistsError:
            return
        os.write(fd, f"{name} {os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
