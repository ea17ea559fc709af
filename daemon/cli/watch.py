"""``wingbeat watch``: send the audio files a recorder writes into a folder, each exactly once.

A file is sent once its size and modification time are the same on two polls (dot-files and ``.part`` files are
never sent). Before its first send it gets a sequence number, written and fsync'd to a journal beside the folder
(``.<DIR>.wingbeat-watch.jsonl``), and every resend uses that number: the daemon stores ``(sensor, seq)`` once, so
a resend after a crash is a duplicate, never a second event. A file is acked in the journal (fsync'd) before it is
moved to ``DIR/sent/`` (or deleted, or kept); a file the journal says is acked is never sent again. Sending reuses
the replay client (DEALER, acks, resends, bounded window), one round per poll.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.cli.clients import Curve, replay
from daemon.data.audio import AudioError, AudioOptions, candidates, read_audio_file
from daemon.protocol import Event

AFTER_ACK = ("move", "keep", "delete")
SENT = "sent"

Key = tuple[str, int, int]  # file relative to the folder, size in bytes, mtime in ns


def journal_path(root: Path) -> Path:
    root = root.resolve()
    return root.parent / f".{root.name}.wingbeat-watch.jsonl"


class Journal:
    """Append-only JSON lines: ``{"sensor"}`` first, then ``{"seq", "file", "size", "mtime_ns"}`` when a file gets
    its number and ``{"seq", "status"}`` when the daemon settles it. Every line is fsync'd before it counts; a line
    torn by a crash is ignored (its file then gets its number again, before any send of it)."""

    def __init__(self, path: Path, sensor: str) -> None:
        self.path = path
        self.seq_of: dict[Key, int] = {}
        self.key_of: dict[int, Key] = {}
        self.status: dict[int, str] = {}
        self.next_seq = 0
        owner = None
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "sensor" in rec:
                    owner = rec["sensor"]
                elif "file" in rec:
                    key = (rec["file"], rec["size"], rec["mtime_ns"])
                    self.seq_of[key], self.key_of[rec["seq"]] = rec["seq"], key
                    self.next_seq = max(self.next_seq, rec["seq"] + 1)
                elif "status" in rec:
                    self.status[rec["seq"]] = rec["status"]
        if owner is not None and owner != sensor:
            raise ValueError(f"{path}: this journal numbers the files of sensor {owner!r}, not {sensor!r}")
        self.f = open(path, "a")
        try:  # one sender per folder: two would number the same files twice (the kernel drops it on kill -9)
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise ValueError(f"{path}: another wingbeat watch is sending this folder") from None
        if owner is None:
            self._write({"sensor": sensor})

    def _write(self, rec: dict[str, Any]) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def assign(self, key: Key) -> int:
        seq = self.seq_of.get(key)
        if seq is None:
            seq = self.next_seq
            self._write({"seq": seq, "file": key[0], "size": key[1], "mtime_ns": key[2]})
            self.seq_of[key], self.key_of[seq] = seq, key
            self.next_seq += 1
        return seq

    def settle(self, seq: int, status: str) -> None:
        self._write({"seq": seq, "status": status})
        self.status[seq] = status

    def settled(self, key: Key) -> str | None:
        seq = self.seq_of.get(key)
        return None if seq is None else self.status.get(seq)

    def close(self) -> None:
        self.f.close()


@dataclass
class WatchResult:
    acked: int = 0
    duplicates: int = 0
    rejected: int = 0
    problems: int = 0
    unacked: int = 0
    seconds: float = 0.0
    files: int = 0  # files seen that were not sent before this run

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class Watcher:
    root: Path
    endpoint: str
    sensor: str
    opts: AudioOptions = field(default_factory=AudioOptions)
    after_ack: str = "move"
    poll_s: float = 1.0
    window: int = 64
    ack_timeout_s: float = 5.0
    give_up_s: float = 60.0
    curve: Curve | None = None
    warn: Callable[[str], None] = print

    def __post_init__(self) -> None:
        if self.after_ack not in AFTER_ACK:
            raise ValueError(f"--after-ack: {self.after_ack!r} is not one of {', '.join(AFTER_ACK)}")
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a directory")
        self.journal = Journal(journal_path(self.root), self.sensor)
        self.result = WatchResult()
        self.reported: set[Key] = set()  # bad files and failed moves, said once per run
        self.last: dict[Path, tuple[int, int]] = {}

    def _key(self, path: Path, st: os.stat_result) -> Key:
        return (path.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns)

    def _problem(self, key: Key, reason: str) -> None:
        if key not in self.reported:
            self.reported.add(key)
            self.result.problems += 1
            self.warn(f"{self.root / key[0]}: {reason}")

    def _finish(self, key: Key) -> None:
        """What happens to a file once the daemon holds it."""
        path = self.root / key[0]
        try:
            if self.after_ack == "delete":
                path.unlink()
            elif self.after_ack == "move":
                dest = self.root / SENT / key[0]
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
        except OSError as e:
            self._problem(key, f"acked, but cannot be {self.after_ack}d to {SENT}/: {e.strerror or e}; not resent")

    def poll(self) -> tuple[list[tuple[Path, Key]], int]:
        """Files complete now (same size and mtime as on the last poll) and not settled, and how many others wait."""
        now: dict[Path, tuple[int, int]] = {}
        ready, waiting = [], 0
        for path in candidates(self.root, exclude=(SENT,)):
            try:
                st = path.stat()
            except OSError:
                continue  # gone between the listing and the stat
            key = self._key(path, st)
            now[path] = (st.st_size, st.st_mtime_ns)
            if key in self.reported:
                continue
            status = self.journal.settled(key)
            if status in ("stored", "duplicate"):
                if self.after_ack != "keep":
                    self._finish(key)  # acked before a crash, not yet moved
                continue
            if status == "rejected":
                continue
            if self.last.get(path) != now[path]:
                waiting += 1
                continue
            ready.append((path, key))
        self.last = now
        return ready, waiting

    def _events(self, files: list[tuple[Path, Key]]) -> Iterator[Event]:
        for path, key in files:
            try:
                a = read_audio_file(path, self.root, self.opts)
            except (AudioError, OSError) as e:
                self._problem(key, str(e))
                continue
            if key not in self.journal.seq_of:
                self.result.files += 1
            seq = self.journal.assign(key)  # fsync'd before the first send
            dtype = a.samples.dtype.name
            yield Event(
                self.sensor, seq, a.t0_ns, a.fs, dtype, a.samples.shape[0], a.samples, a.label, {"file": a.file}
            )

    def _on_ack(self, body: dict[str, Any], _seconds: float) -> None:
        seq, status = body["seq"], body["status"]
        key = self.journal.key_of.get(seq)
        if key is None:
            return
        self.journal.settle(seq, status)
        if status == "rejected":
            self.result.rejected += 1
            self._problem(key, f"rejected by the daemon ({body.get('reason', '?')}); not resent")
            return
        self.result.acked += 1
        self.result.duplicates += status == "duplicate"
        if self.after_ack != "keep":
            self._finish(key)

    def round(self, files: list[tuple[Path, Key]]) -> int:
        """Send ``files``; the number left unacked."""
        res = replay(
            self._events(files), self.endpoint, 0.0, self.window, self.ack_timeout_s, self.give_up_s,
            on_ack=self._on_ack, curve=self.curve,
        )  # fmt: skip
        return res.unacked

    def run(self, once: bool = False, stop: Callable[[], bool] = lambda: False) -> WatchResult:
        """Poll and send until ``stop()``; with ``once``, until every file there is settled (or a round gives up)."""
        start = time.monotonic()
        try:
            self.poll()  # the first look: nothing is known complete yet
            while not stop():
                time.sleep(self.poll_s)
                ready, waiting = self.poll()
                unacked = self.round(ready) if ready else 0
                self.result.unacked = unacked
                if once and (unacked or (not ready and not waiting)):
                    break
        finally:
            self.result.seconds = time.monotonic() - start
            self.journal.close()
        return self.result
