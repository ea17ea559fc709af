"""Spectral features (DESIGN §3): batched Welch → fixed frequency grid → log10 → min-max. Pure.

Every event is a ``(channels, samples)`` array recorded at its own sample rate. All segments of all events
that share a segment length go through one FFT; the per-(event, channel) averages come back with
``np.add.reduceat``. Each instrument's spectrum is then interpolated onto one fixed frequency grid, so a
single model serves instruments with different sample rates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.signal

from model import blockdft

REFERENCE_FS = 20_800.0  # Hz; the paper's instrument: nperseg 1000 → 48 ms segments


class FeatureError(ValueError):
    """An event that cannot become a feature vector; ``index`` names it, ``reason`` is a short tag."""

    def __init__(self, index: int, reason: str, detail: str) -> None:
        super().__init__(f"event {index}: {detail}")
        self.index = index
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FeatureConfig:
    """How events become feature vectors.

    Parameters
    ----------
    f_max : highest grid frequency in Hz (bins at ``0, df, 2·df, … ≤ f_max``).
    df : grid spacing in Hz (``fs / nfft`` of the reference instrument, 20.8 kHz / 2000).
    segment_s : Welch segment length in seconds (1000 samples at 20.8 kHz).
    overlap : fraction of a segment shared with the next one.
    min_samples : events with fewer samples per channel are rejected as ``too_short``; between this and one
        segment, the segment shrinks to the event (zero-padded to the usual nfft).
    eps : added to the power before log10, in the power's own units.
    """

    f_max: float = 2000.0
    df: float = 10.4
    segment_s: float = 1000.0 / REFERENCE_FS
    overlap: float = 0.8
    min_samples: int = 64
    eps: float = 1e-10

    def __post_init__(self) -> None:
        for name in ("f_max", "df", "segment_s", "eps"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap!r}")
        if self.min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {self.min_samples!r}")

    @property
    def n_bins(self) -> int:
        return int(np.floor(self.f_max / self.df + 1e-9)) + 1

    @property
    def grid(self) -> np.ndarray:
        """Grid frequencies in Hz, shape (n_bins,)."""
        return np.arange(self.n_bins) * self.df

    def nperseg(self, fs: float) -> int:
        """Nominal segment length in samples at sample rate ``fs`` (Hz)."""
        return max(2, int(round(fs * self.segment_s)))

    def plan(self, fs: float, n: int) -> tuple[int, int, int]:
        """(segment length, hop, nfft) for an event of ``n`` samples at ``fs`` Hz; nfft stays 2 × nominal."""
        nominal = self.nperseg(fs)
        seg = min(nominal, n)
        hop = max(1, seg - int(round(self.overlap * seg)))
        return seg, hop, 2 * nominal


@dataclass
class FeatureBatch:
    """Features of a batch: rows with ``ok`` False are NaN; ``errors`` maps event index (``first_index`` + row)
    to why."""

    features: np.ndarray  # (events, channels, bins) float32
    ok: np.ndarray  # (events,) bool
    errors: dict[int, FeatureError] = field(default_factory=dict)


def _frames(x: np.ndarray, seg: int, hop: int) -> np.ndarray:
    """(samples,) contiguous → (segments, seg) view with stride ``hop``; no copy (cheaper than sliding_window_view)."""
    nseg = (x.shape[0] - seg) // hop + 1
    step = x.strides[0]
    return np.ndarray((nseg, seg), dtype=x.dtype, buffer=x, strides=(hop * step, step))


def _welch_group(events: Sequence[np.ndarray], fs: float, seg: int, hop: int, nfft: int, kept: int) -> np.ndarray:
    """Mean one-sided PSD of the first ``kept`` bins for events (channels, samples) that share one plan and one
    sample rate: (all channels of all events in order, kept) float32.

    Segments of all channels go through one zero-padded float32 buffer of about 4 MB, reused: every segment is
    written once (mean removed, windowed), the FFT runs in cache, and power and averaging are done per buffer
    while it is in cache. Segment means come from sums of shared pieces, not one pass per segment.
    """
    if blockdft.applies(seg, hop, nfft):
        return blockdft.welch_blocks(events, fs, seg, hop, nfft, kept)
    window = scipy.signal.get_window("hann", seg).astype(np.float32)
    n_bins = nfft // 2 + 1
    frames: list[np.ndarray] = []  # per channel: (segments, seg) strided views of its float32 samples
    means: list[np.ndarray] = []  # per channel: (segments,) float32 segment means
    for x in events:
        xf = np.ascontiguousarray(x, dtype=np.float32)
        nseg = (xf.shape[1] - seg) // hop + 1
        # segment sums from sums of gcd(seg, hop)-sample pieces (pairwise in float32, then prefix sums in float64)
        g = math.gcd(seg, hop)
        m_pieces = ((nseg - 1) * hop + seg) // g
        prefix = np.zeros((xf.shape[0], m_pieces + 1))
        np.cumsum(xf[:, : m_pieces * g].reshape(xf.shape[0], m_pieces, g).sum(axis=2), axis=1, out=prefix[:, 1:])
        starts = np.arange(nseg) * (hop // g)
        m = ((prefix[:, starts + seg // g] - prefix[:, starts]) / seg).astype(np.float32)
        for c in range(xf.shape[0]):
            frames.append(_frames(xf[c], seg, hop))
            means.append(m[c])
    counts = np.array([len(m) for m in means])
    sums = np.zeros((len(frames), kept), dtype=np.float32)
    block = max(1, (4 << 20) // (4 * nfft))
    buf = np.zeros((block, nfft), dtype=np.float32)
    ch = first = 0  # next segment to write: channel, and segment within it
    total = int(counts.sum())
    done = 0
    while done < total:
        n = min(block, total - done)
        filled = 0
        piece_rows, piece_chans = [], []
        while filled < n:  # fill the buffer from the channels' segments, in order
            take = min(int(counts[ch]) - first, n - filled)
            out = buf[filled : filled + take, :seg]
            np.subtract(frames[ch][first : first + take], means[ch][first : first + take, None], out=out)
            out *= window
            piece_rows.append(filled)
            piece_chans.append(ch)
            filled, first = filled + take, first + take
            if first == counts[ch]:
                ch, first = ch + 1, 0
        spec = scipy.fft.rfft(buf[:n], axis=1, workers=1)[:, :kept]
        power = np.square(spec.real)
        power += np.square(spec.imag)
        sums[piece_chans] += np.add.reduceat(power, piece_rows, axis=0)  # channels in one buffer are distinct
        done += n
    mean = sums / counts[:, None].astype(np.float32)
    last = n_bins - 1 if nfft % 2 == 0 else n_bins  # the Nyquist bin of an even nfft has no mirror
    mean[:, 1 : min(last, kept)] *= 2  # one-sided: fold negative frequencies
    mean /= np.float32(fs * float(np.sum(window.astype(np.float64) ** 2)))
    return mean


def _plans(
    events: Sequence[np.ndarray], fs: np.ndarray, cfg: FeatureConfig, f_keep: float | None
) -> dict[tuple[float, int, int, int, int], list[int]]:
    """Events grouped by (fs, seg, hop, nfft, kept bins): each group is one batched Welch."""
    if len(fs) != len(events):
        raise ValueError(f"got {len(events)} events but {len(fs)} sample rates")
    groups: dict[tuple[float, int, int, int, int], list[int]] = {}
    for i, x in enumerate(events):
        if x.ndim != 2 or x.shape[1] < 1:
            raise ValueError(f"event {i}: expected shape (channels, samples), got {x.shape}")
        f = float(fs[i])
        seg, hop, nfft = cfg.plan(f, x.shape[1])
        n_bins = nfft // 2 + 1
        kept = n_bins
        if f_keep is not None:
            kept = min(n_bins, int(np.searchsorted(np.arange(n_bins) * (f / nfft), f_keep)) + 1)
        groups.setdefault((f, seg, hop, nfft, kept), []).append(i)
    return groups


def welch(
    events: Sequence[np.ndarray], fs: Sequence[float] | np.ndarray, cfg: FeatureConfig, f_keep: float | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One-sided Welch power spectral density (V²/Hz) of every event, batched.

    Same as ``scipy.signal.welch(x, fs, window="hann", nperseg=seg, noverlap=seg - hop, nfft=nfft)`` with
    ``(seg, hop, nfft) = cfg.plan(fs, n)``, computed in float32.

    Parameters
    ----------
    events : arrays of shape (channels, samples), any real dtype.
    fs : sample rate of each event in Hz.
    f_keep : if given, drop bins above the first one at or beyond this frequency (Hz).

    Returns
    -------
    ``(freqs, psd)`` per event: freqs (bins,) in Hz, psd (channels, bins) float32.
    """
    fs = np.asarray(fs, dtype=np.float64).reshape(-1)
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty((0, 0), np.float32))] * len(events)
    for (f, seg, hop, nfft, kept), members in _plans(events, fs, cfg, f_keep).items():
        psd = _welch_group([events[i] for i in members], f, seg, hop, nfft, kept)
        freqs = np.arange(kept) * (f / nfft)
        row = 0
        for i in members:
            c = events[i].shape[0]
            out[i] = (freqs, psd[row : row + c])
            row += c
    return out


def to_grid(freqs: np.ndarray, power: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``power`` (..., len(freqs)) from ``freqs`` onto ``grid`` (Hz).

    Identity (a copy) when the two axes agree; the grid must lie within ``freqs``.
    """
    if len(freqs) >= len(grid) and np.allclose(freqs[: len(grid)], grid, rtol=0, atol=1e-6 * max(1.0, grid[-1])):
        return np.array(power[..., : len(grid)])
    if grid[-1] > freqs[-1] + 1e-9 or grid[0] < freqs[0] - 1e-9:
        raise ValueError(f"grid {grid[0]:g}–{grid[-1]:g} Hz is outside the spectrum's {freqs[0]:g}–{freqs[-1]:g} Hz")
    hi = np.clip(np.searchsorted(freqs, grid, side="right"), 1, len(freqs) - 1)
    lo = hi - 1
    w = ((grid - freqs[lo]) / (freqs[hi] - freqs[lo])).astype(power.dtype)
    return power[..., lo] * (1 - w) + power[..., hi] * w


def log_minmax(power: np.ndarray, eps: float | None, first_index: int = 0) -> FeatureBatch:
    """``log10(P + eps)`` (skipped when ``eps`` is None), then min-max over each whole event to [0, 1].

    ``power`` is (events, channels, bins). Events that are non-finite or constant are flagged, not raised.
    """
    x = np.asarray(power, dtype=np.float64)
    n = x.shape[0]
    errors: dict[int, FeatureError] = {}
    flat = x.reshape(n, -1)
    finite = np.isfinite(flat).all(axis=1)
    if eps is not None:
        negative = finite & (flat < 0).any(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            flat = np.log10(flat + eps)
        for neg in np.flatnonzero(negative).tolist():
            errors[neg] = FeatureError(first_index + neg, "negative_power", "power spectrum has negative values")
    for bad in np.flatnonzero(~finite).tolist():
        errors[bad] = FeatureError(first_index + bad, "non_finite", "contains NaN or infinite values")
    with np.errstate(invalid="ignore"):
        lo = flat.min(axis=1, keepdims=True)
        span = flat.max(axis=1, keepdims=True) - lo
    for flat_i in np.flatnonzero(finite & ~(span[:, 0] > 0)).tolist():
        errors.setdefault(flat_i, FeatureError(first_index + flat_i, "constant", "is constant: no shape to learn"))
    ok = np.ones(n, dtype=bool)
    ok[list(errors)] = False
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = (flat - lo) / np.where(span > 0, span, 1.0)
    scaled[~ok] = np.nan
    return FeatureBatch(scaled.reshape(x.shape).astype(np.float32), ok, {first_index + k: v for k, v in errors.items()})


def featurise_events(
    events: Sequence[np.ndarray], fs: Sequence[float] | np.ndarray, cfg: FeatureConfig, first_index: int = 0
) -> FeatureBatch:
    """Raw events (channels, samples) → features (events, channels, cfg.n_bins). All events need one channel count.

    Bad events (too short, sample rate too low for the grid, non-finite, constant) are flagged in the result.
    """
    fs = np.asarray(fs, dtype=np.float64).reshape(-1)
    n = len(events)
    channels = {int(e.shape[0]) for e in events}
    if len(channels) > 1:
        raise ValueError(f"events have different channel counts {sorted(channels)}; one model needs one count")
    c = channels.pop() if channels else 1
    out = np.full((n, c, cfg.n_bins), np.nan, dtype=np.float32)
    errors: dict[int, FeatureError] = {}
    good = []
    for i, (e, f) in enumerate(zip(events, fs, strict=True)):
        if not (np.isfinite(f) and f > 0):
            errors[i] = FeatureError(first_index + i, "bad_fs", f"sample rate must be a positive number, got {f}")
        elif f < 2 * cfg.f_max:
            errors[i] = FeatureError(
                first_index + i, "fs_too_low", f"sample rate {f:g} Hz cannot resolve the {cfg.f_max:g} Hz grid"
            )
        elif e.shape[1] < cfg.min_samples:
            errors[i] = FeatureError(
                first_index + i, "too_short", f"has {e.shape[1]} samples, fewer than the minimum {cfg.min_samples}"
            )
        elif e.dtype.kind == "f" and not np.isfinite(e).all():  # integer samples are always finite
            errors[i] = FeatureError(first_index + i, "non_finite", "contains NaN or infinite samples")
        else:
            good.append(i)
    gridded = np.empty((len(good), c, cfg.n_bins), dtype=np.float32)
    good_events = [events[i] for i in good]
    for (rate, seg, hop, nfft, kept), rows in _plans(good_events, fs[good], cfg, cfg.f_max).items():
        psd = _welch_group([good_events[r] for r in rows], rate, seg, hop, nfft, kept)
        gridded[rows] = to_grid(np.arange(kept) * (rate / nfft), psd.reshape(len(rows), c, kept), cfg.grid)
    batch = log_minmax(gridded, cfg.eps)
    for row, i in enumerate(good):
        if batch.ok[row]:
            out[i] = batch.features[row]
        else:
            err = batch.errors[row]
            errors[i] = FeatureError(first_index + i, err.reason, err.detail)
    ok = np.ones(n, dtype=bool)
    ok[list(errors)] = False
    return FeatureBatch(out, ok, {first_index + i: e for i, e in errors.items()})


def featurise_spectra(spectra: np.ndarray, freqs: np.ndarray, cfg: FeatureConfig) -> FeatureBatch:
    """Linear power spectra (events, channels, bins) at ``freqs`` Hz → features on the grid."""
    return log_minmax(to_grid(np.asarray(freqs, np.float64), np.asarray(spectra, np.float32), cfg.grid), cfg.eps)


def scale_features(features: np.ndarray) -> FeatureBatch:
    """Already-transformed features (events, channels, bins): only min-max over each event."""
    return log_minmax(features, eps=None)
