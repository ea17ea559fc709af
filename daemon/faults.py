"""Crash points for the fault-injection suite (tests/test_faults.py), off unless the environment asks.

``WINGBEAT_CRASH_AT=POINT`` makes the process SIGKILL itself the first time it reaches ``crash_point(POINT)``:
no clean-up, no flush, as a power cut or the OOM killer would. ``WINGBEAT_CRASH_MARKER=FILE`` makes it once per
marker file across processes (the marker is written first), so a restart with the same environment runs through.
Points: before_commit, after_commit, mid_publish, swap (daemon); trainer_epoch, trainer_write (trainer).
"""

from __future__ import annotations

import os
import signal

_AT = os.environ.get("WINGBEAT_CRASH_AT", "")
_MARKER = os.environ.get("WINGBEAT_CRASH_MARKER", "")


def crash_point(name: str) -> None:
    if not _AT or name != _AT:
        return
    if _MARKER:
        try:
            fd = os.open(_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one process wins
        except FileExistsError:
            return
        os.write(fd, f"{name} {os.getpid()}\n".encode())
        os.fsync(fd)
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
