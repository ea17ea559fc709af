"""Data-set files (DESIGN §8): load and check ``.npz`` archives, never unpickling; turn them into features."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.spectra import FeatureConfig, FeatureError, featurise_events, featurise_spectra, scale_features

if TYPE_CHECKING:
    from daemon.data.audio import AudioOptions

SAMPLE_DTYPES = ("int16", "uint16", "int32", "float32", "float64")
KINDS = ("recordings", "spectra", "features")
CHUNK = 2048  # events featurised at a time, to bound memory


class DatasetError(ValueError):
    """A data-set file that cannot be used; the message names the file and the problem."""


@dataclass
class Recordings:
    samples: np.ndarray  # 1-D
    offsets: np.ndarray  # (N+1,) int64
    channels: np.ndarray  # (N,) int64
    fs: np.ndarray  # (N,) float64
    label: np.ndarray  # (N,) str, "" = unlabelled
    sensor: np.ndarray  # (N,) str
    t0_ns: np.ndarray  # (N,) int64
    meta: list[dict[str, Any]] | None = None  # per event, for recordings read from a folder of audio files

    def __len__(self) -> int:
        return len(self.channels)

    def event(self, i: int) -> np.ndarray:
        """Event i as (channels, samples)."""
        return self.samples[self.offsets[i] : self.offsets[i + 1]].reshape(int(self.channels[i]), -1)


@dataclass
class Dataset:
    path: Path
    kind: str  # one of KINDS
    features: np.ndarray  # (N, C, F) float32 in [0, 1]
    label: np.ndarray  # (N,) str
    sha256: str
    skipped: dict[int, str]  # event index → why it has no features (only with skip_bad)

    @property
    def labelled(self) -> np.ndarray:
        return self.label != ""


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                try:
                    out[k] = z[k]
                except ValueError as e:
                    if "pickle" in str(e):
                        raise DatasetError(
                            f"{path}: key {k!r} holds pickled objects, which Wingbeat never loads"
                        ) from None
                    raise DatasetError(f"{path}: key {k!r} cannot be read ({e})") from None
            return out
    except DatasetError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({e})") from None


def _strings(d: dict[str, np.ndarray], key: str, n: int, path: Path) -> np.ndarray:
    if key not in d:
        return np.full(n, "", dtype="<U1")
    a = d[key]
    if a.dtype.kind != "U" or a.shape != (n,):
        raise DatasetError(f"{path}: {key!r} must be a unicode string array of shape ({n},), got {a.dtype} {a.shape}")
    return a


def _need(d: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in d:
        raise DatasetError(f"{path}: missing key {key!r} (has {', '.join(sorted(d)) or 'no keys'})")
    return d[key]


def read_recordings(path: Path) -> Recordings:
    """A recordings data set, with every shape and value checked."""
    d = _load(path)
    samples, offsets = _need(d, "samples", path), _need(d, "offsets", path)
    channels, fs = _need(d, "channels", path), _need(d, "fs", path)
    if samples.ndim != 1 or samples.dtype.name not in SAMPLE_DTYPES:
        raise DatasetError(
            f"{path}: 'samples' must be 1-D of {'/'.join(SAMPLE_DTYPES)}, got {samples.dtype} {samples.shape}"
        )
    n = len(channels)
    if channels.ndim != 1 or channels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: 'channels' must be a 1-D integer array, got {channels.dtype} {channels.shape}")
    if offsets.shape != (n + 1,) or offsets.dtype.kind not in "iu":
        raise DatasetError(
            f"{path}: 'offsets' must be integers of shape ({n + 1},), got {offsets.dtype} {offsets.shape}"
        )
    if fs.shape != (n,) or fs.dtype.kind not in "fiu":
        raise DatasetError(f"{path}: 'fs' must be numbers of shape ({n},), got {fs.dtype} {fs.shape}")
    offsets = offsets.astype(np.int64)
    if n and (offsets[0] != 0 or offsets[-1] != len(samples) or (np.diff(offsets) < 0).any()):
        raise DatasetError(f"{path}: 'offsets' must rise from 0 to len(samples) = {len(samples)}")
    bad = np.flatnonzero(channels < 1)
    if len(bad):
        raise DatasetError(f"{path}: event {bad[0]}: 'channels' must be >= 1, got {channels[bad[0]]}")
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths % np.maximum(channels, 1))
    if len(bad):
        i = bad[0]
        raise DatasetError(f"{path}: event {i}: {lengths[i]} samples do not split into {channels[i]} channels")
    fs = fs.astype(np.float64)
    bad = np.flatnonzero(~(np.isfinite(fs) & (fs > 0)))
    if len(bad):
        raise DatasetError(f"{path}: event {bad[0]}: 'fs' must be a positive number of Hz, got {fs[bad[0]]}")
    t0 = d.get("t0_ns", np.zeros(n, np.int64))
    if t0.shape != (n,) or t0.dtype.kind not in "iu":
        raise DatasetError(f"{path}: 't0_ns' must be integers of shape ({n},), got {t0.dtype} {t0.shape}")
    return Recordings(
        samples, offsets, channels.astype(np.int64), fs,
        _strings(d, "label", n, path), _strings(d, "sensor", n, path), t0.astype(np.int64),
    )  # fmt: skip


def _stderr(line: str) -> None:
    print(f"wingbeat: {line}", file=sys.stderr)


def read_folder(
    path: Path, audio: AudioOptions | None = None, warn: Callable[[str], None] = _stderr, digest: bool = True
) -> tuple[Recordings, str]:
    """A folder of audio files as recordings and the digest of the files read ("" without ``digest``). Each file
    that cannot be read is one ``warn`` line (its name and why), then their count; a DatasetError when none could
    be read."""
    from daemon.data.audio import AudioError, AudioOptions, as_arrays, folder_sha256, read_audio_folder

    try:
        folder = read_audio_folder(path, audio or AudioOptions())
    except AudioError as e:
        raise DatasetError(str(e)) from None
    for p in folder.problems:
        warn(f"{path / p.file}: {p.reason}")
    if folder.problems:
        warn(f"{len(folder.problems)} of {folder.tried} files in {path} could not be read")
    if not folder.events:
        what = f"none of its {folder.tried} files could be read" if folder.tried else "it holds no files"
        raise DatasetError(f"{path}: no audio to read: {what}")
    d = as_arrays(folder.events)
    rec = Recordings(
        d["samples"], d["offsets"], d["channels"], d["fs"], d["label"],
        np.full(len(folder.events), "", dtype="<U1"), d["t0_ns"], [{"file": f} for f in d["files"]],
    )  # fmt: skip
    return rec, folder_sha256(path, d["files"]) if digest else ""


def load_recordings(path: Path, audio: AudioOptions | None = None, warn: Callable[[str], None] = _stderr) -> Recordings:
    """Recordings from a ``.npz`` data set or from a folder of audio files (``audio``: how files become events)."""
    return read_folder(path, audio, warn, digest=False)[0] if path.is_dir() else read_recordings(path)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_dataset(
    path: Path | str,
    cfg: FeatureConfig,
    skip_bad: bool = False,
    audio: AudioOptions | None = None,
    warn: Callable[[str], None] = _stderr,
) -> Dataset:
    """Any of the three data-set kinds, or a folder of audio files (read as ``audio`` says, its unreadable files
    reported through ``warn``) → features on ``cfg``'s grid (or as stored, for ``features``).

    Events that cannot be featurised raise a DatasetError naming them, unless ``skip_bad``.
    """
    path = Path(path)
    sha = ""
    if path.is_dir():
        rec, sha = read_folder(path, audio, warn)
        d: dict[str, np.ndarray] = {"samples": rec.samples}
    else:
        d = _load(path)
    if "samples" in d:
        kind = "recordings"
        if not sha:
            rec = read_recordings(path)
        n = len(rec)
        label = rec.label
        if len(set(rec.channels.tolist())) > 1:
            raise DatasetError(f"{path}: events have different channel counts {sorted(set(rec.channels.tolist()))}")
        c = int(rec.channels[0]) if n else 1
        feats = np.full((n, c, cfg.n_bins), np.nan, np.float32)
        ok = np.ones(n, dtype=bool)
        errors: dict[int, FeatureError] = {}
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            batch = featurise_events([rec.event(i) for i in range(start, stop)], rec.fs[start:stop], cfg, start)
            feats[start:stop], ok[start:stop] = batch.features, batch.ok
            errors.update(batch.errors)
    elif "spectra" in d or "features" in d:
        key = "spectra" if "spectra" in d else "features"
        kind = key
        x = d[key]
        if x.ndim != 3 or x.dtype.kind != "f" or 0 in x.shape:
            raise DatasetError(
                f"{path}: {key!r} must be a non-empty float array (events, channels, bins), got {x.dtype} {x.shape}"
            )
        n = len(x)
        label = _strings(d, "label", n, path)
        if key == "spectra":
            freqs = _need(d, "freqs", path)
            if freqs.shape != (x.shape[2],) or not np.isfinite(freqs).all() or (np.diff(freqs) <= 0).any():
                raise DatasetError(
                    f"{path}: 'freqs' must be {x.shape[2]} increasing frequencies in Hz, got shape {freqs.shape}"
                )
            try:
                batch = featurise_spectra(x, freqs, cfg)
            except ValueError as e:
                raise DatasetError(f"{path}: {e}") from None
        else:
            batch = scale_features(x)
        feats, ok, errors = batch.features, batch.ok, batch.errors  # first_index 0: keys are event indices
    else:
        raise DatasetError(
            f"{path}: not a Wingbeat data set: needs 'samples' (recordings), 'spectra' or 'features'; "
            f"has {', '.join(sorted(d)) or 'no keys'}"
        )
    if n == 0:
        raise DatasetError(f"{path}: holds no events")
    if errors and not skip_bad:
        first = [str(errors[i]) for i in sorted(errors)[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise DatasetError(f"{path}: {'; '.join(first)}{more}; use --skip-bad to leave such events out")
    keep = ok
    sha = sha or file_sha256(path)
    return Dataset(path, kind, feats[keep], label[keep], sha, {i: str(e) for i, e in errors.items()})
