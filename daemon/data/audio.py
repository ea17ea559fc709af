"""Folders of audio files (WAV, FLAC) as recordings: one file is one event, one audio channel one wavelength.

Field recorders and public wing-beat data sets ship one file per insect, often one folder per species; this reads
such a folder into the same ``Recordings`` a ``.npz`` gives, so every command that takes a data set takes a folder.
A file that cannot be used is a ``FileProblem`` (its path and why), never a silent skip and never the end of the
others.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from daemon.protocol import Limits

SUFFIXES = (".wav", ".flac")
LABEL_FROM = ("parent",)
# soundfile's subtype → the protocol dtype it is read as (integer PCM kept as integers; the rest as float32)
SUBTYPE_DTYPES = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32", "FLOAT": "float32", "DOUBLE": "float64"}


class AudioError(ValueError):
    """One file that cannot be an event; the message says why (the caller adds the file's name)."""


@dataclass(frozen=True)
class AudioOptions:
    """How files become events: ``label_from`` None (unlabelled) or "parent" (the folder's name); ``time_from``
    "mtime" (the file's modification time) or "name:<strftime pattern>" (matched against the file's stem, UTC
    unless the pattern carries a zone)."""

    label_from: str | None = None
    time_from: str = "mtime"
    max_channels: int = Limits().max_channels
    min_samples: int = Limits().min_samples

    def __post_init__(self) -> None:
        if self.label_from is not None and self.label_from not in LABEL_FROM:
            raise ValueError(f"--label-from: {self.label_from!r} is not one of {', '.join(LABEL_FROM)}")
        if self.time_from != "mtime" and not (self.time_from.startswith("name:") and len(self.time_from) > 5):
            raise ValueError(f"--time-from: {self.time_from!r} is neither 'mtime' nor 'name:<strftime pattern>'")


@dataclass
class AudioEvent:
    """One file read: samples (channels, n) in a protocol dtype, sample rate in Hz, label, start in ns since the
    Unix epoch, and the file's path relative to the folder (the event's ``meta.file``)."""

    samples: np.ndarray
    fs: float
    label: str
    t0_ns: int
    file: str


@dataclass(frozen=True)
class FileProblem:
    file: str  # relative to the folder
    reason: str

    def line(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class AudioFolder:
    root: Path
    events: list[AudioEvent] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)

    @property
    def tried(self) -> int:
        return len(self.events) + len(self.problems)


def _time(path: Path, opts: AudioOptions) -> int:
    if opts.time_from == "mtime":
        return path.stat().st_mtime_ns
    pattern = opts.time_from[5:]
    try:
        t = datetime.strptime(path.stem, pattern)
    except ValueError:
        raise AudioError(f"name {path.stem!r} does not match --time-from pattern {pattern!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    ns = int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1000
    if ns <= 0:
        raise AudioError(f"name {path.stem!r} gives a time before 1970 ({t.isoformat()})")
    return ns


def read_audio_file(path: Path, root: Path, opts: AudioOptions) -> AudioEvent:
    """One file as an event, checked against the protocol's limits; AudioError says why it cannot be one."""
    rel = path.relative_to(root).as_posix()
    if path.suffix.lower() not in SUFFIXES:
        raise AudioError(f"not a WAV or FLAC file (suffix {path.suffix or 'none'!r})")
    try:
        info = sf.info(str(path))
        dtype = SUBTYPE_DTYPES.get(info.subtype, "float32")
        data = sf.read(str(path), dtype=dtype, always_2d=True)[0]
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise AudioError(f"cannot be read as audio ({' '.join(str(e).split())})") from None
    n, c = data.shape
    if c > opts.max_channels:
        raise AudioError(f"{c} channels (at most {opts.max_channels} wavelengths allowed)")
    if n < opts.min_samples:
        raise AudioError(f"{n} samples per channel (need at least {opts.min_samples})")
    if not info.samplerate > 0:
        raise AudioError(f"sample rate {info.samplerate} Hz")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise AudioError("samples contain NaN or Inf")
    label = path.parent.name if opts.label_from == "parent" else ""
    return AudioEvent(np.ascontiguousarray(data.T), float(info.samplerate), label, _time(path, opts), rel)


def candidates(root: Path, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under ``root`` in name order, leaving out dot-files, dot-folders, ``.part`` files and the
    top-level folders in ``exclude``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in exclude))
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith(".part"):
                p = Path(dirpath) / name
                if p.is_file():
                    out.append(p)
    return out


def read_audio_folder(root: Path, opts: AudioOptions) -> AudioFolder:
    """Every file under ``root``: the events that could be read and, by file, why the others could not.

    Files whose channel count differs from the most common one are problems too: a data set has one channel
    count (the model's input width).
    """
    if not root.is_dir():
        raise AudioError(f"{root}: not a directory")
    folder = AudioFolder(root)
    for path in candidates(root):
        try:
            folder.events.append(read_audio_file(path, root, opts))
        except AudioError as e:
            folder.problems.append(FileProblem(path.relative_to(root).as_posix(), str(e)))
        except OSError as e:
            folder.problems.append(FileProblem(path.relative_to(root).as_posix(), e.strerror or str(e)))
    counts = Counter(e.samples.shape[0] for e in folder.events)
    if len(counts) > 1:
        common = counts.most_common(1)[0][0]
        keep = []
        for ev in folder.events:
            if ev.samples.shape[0] == common:
                keep.append(ev)
            else:
                folder.problems.append(
                    FileProblem(ev.file, f"{ev.samples.shape[0]} channels where the other files have {common}")
                )
        folder.events = keep
    folder.problems.sort(key=lambda p: p.file)
    return folder


def as_arrays(events: list[AudioEvent]) -> dict[str, Any]:
    """Events as the arrays of a recordings data set (DESIGN §8), with the files' names beside them."""
    dtypes = {e.samples.dtype for e in events}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.result_type(np.float32, *dtypes)
    lengths = [e.samples.size for e in events]
    return {
        "samples": np.concatenate([e.samples.ravel().astype(dtype, copy=False) for e in events]),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "channels": np.array([e.samples.shape[0] for e in events], np.int64),
        "fs": np.array([e.fs for e in events], np.float64),
        "label": np.array([e.label for e in events], dtype=str) if events else np.array([], "<U1"),
        "t0_ns": np.array([e.t0_ns for e in events], np.int64),
        "files": [e.file for e in events],
    }


def folder_sha256(root: Path, files: list[str]) -> str:
    """A digest of the files read (names and contents): what a model version records as its data."""
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(root / rel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
