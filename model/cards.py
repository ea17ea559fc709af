"""Cluster cards: what a person needs to name a cluster by its wing-beat. Pure: arrays in, plain dicts out.

An ecologist recognises an insect group by its wing-beat frequency and the shape of its harmonics, not by a
latent coordinate. Each model version records, per cluster: its size, the mean feature spectrum per channel,
the estimated fundamental (wing-beat) frequency f0 with its spread over the cluster's events, the relative
strength of the first harmonics, and the counts of labelled species that fall in it.

The estimator is subharmonic summation (Hermes 1988) on the feature spectrum (log power, min-max scaled):
for every candidate f0 the spectrum's height above its median at f0, 2·f0, 3·f0, … is summed with weights
that fall off with the harmonic number. A candidate at half the true f0 lands every other term in a trough
(negative height) and loses; one at twice the true f0 misses the fundamental, the strongest term. Bins below
``f_min`` are left out: the body's transit (the insect's shadow) puts its power there, below any wing-beat of
interest, and the grid's 10.4 Hz bins cannot resolve a wing-beat below a few bins anyway.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.ndimage

F_MIN = 40.0  # Hz: lowest wing-beat searched for (4 bins of the 10.4 Hz grid; the body's transit lies below)
HARMONICS = 4  # harmonics summed for f0, and reported per card
FLOOR_HZ = 100.0  # Hz: width of the running median taken as the noise floor (wider than a harmonic's peak)
WEIGHT = 0.84  # weight ratio between successive harmonics (Hermes' value)


def _heights(spectra: np.ndarray, freqs: np.ndarray, f_min: float) -> np.ndarray:
    """(events, bins) height above the local floor (a running median over ``FLOOR_HZ``); zero below ``f_min``.

    A local floor, not one level for the whole spectrum: the body's power falls off slowly above ``f_min``, and
    measured against a global median that slope outscores a real harmonic near it.
    """
    width = max(3, int(round(FLOOR_HZ / (freqs[1] - freqs[0]))) | 1)
    floor = scipy.ndimage.median_filter(spectra, size=(1, width), mode="nearest")
    return np.where(freqs >= f_min, spectra - floor, 0.0)


def _peak_at(h: np.ndarray, freqs: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(events, candidates) height near ``f`` (candidates,) Hz; 0 beyond the grid.

    The larger of the two neighbouring bins, each discounted linearly with its distance from ``f`` (by a quarter
    at half a bin): not a linear interpolation, which would halve the peak of a harmonic that falls between
    bins, yet candidates whose harmonics sit on the bins' centres still score highest.
    """
    df = freqs[1] - freqs[0]
    pos = (f - freqs[0]) / df
    lo = np.clip(np.floor(pos).astype(np.int64), 0, len(freqs) - 1)
    hi = np.clip(lo + 1, 0, len(freqs) - 1)
    frac = pos - np.floor(pos)
    near = np.maximum(h[:, lo] * (1 - frac / 2), h[:, hi] * (1 - (1 - frac) / 2))
    return np.where((f <= freqs[-1] + df / 2)[None], near, 0.0)


def fundamental(
    spectra: np.ndarray,
    freqs: np.ndarray,
    f_min: float = F_MIN,
    f_max: float | None = None,
    harmonics: int = HARMONICS,
    step: float | None = None,
) -> np.ndarray:
    """Wing-beat fundamental of each spectrum by subharmonic summation.

    Parameters
    ----------
    spectra : (events, bins) or (bins,) feature spectra (any monotone transform of power; log power here).
    freqs : (bins,) evenly spaced grid frequencies in Hz.
    f_min, f_max : search range in Hz (``f_max`` defaults to half the grid's top, so that a second harmonic fits).
    harmonics : number of harmonics summed.
    step : candidate spacing in Hz (default a quarter bin).

    Returns
    -------
    (events,) f0 in Hz (a scalar array for one spectrum).
    """
    s = np.asarray(spectra, dtype=np.float64)
    one = s.ndim == 1
    s = s.reshape(-1, s.shape[-1])
    freqs = np.asarray(freqs, dtype=np.float64)
    if s.shape[1] != len(freqs) or len(freqs) < 2:
        raise ValueError(f"spectra have {s.shape[1]} bins but freqs has {len(freqs)}")
    df = float(freqs[1] - freqs[0])
    top = freqs[-1] / 2 if f_max is None else f_max
    if not 0 < f_min < top:
        raise ValueError(f"need 0 < f_min < f_max, got {f_min} and {top} Hz")
    cand = np.arange(f_min, top + 1e-9, step or df / 4)  # (candidates,)
    h = _heights(s, freqs, f_min)
    w = WEIGHT ** np.arange(harmonics)
    score = sum(w[k] * _peak_at(h, freqs, (k + 1) * cand) for k in range(harmonics))  # (events, candidates)
    f0 = cand[np.argmax(score, axis=1)]
    return f0[0] if one else f0


def harmonic_strengths(
    spectrum: np.ndarray, freqs: np.ndarray, f0: float, harmonics: int = HARMONICS, f_min: float = F_MIN
) -> list[float]:
    """Height of harmonics 1…``harmonics`` above the spectrum's median, relative to the fundamental's (= 1).

    In units of the feature (scaled log power), so 0.5 means the harmonic stands half as far above the noise
    floor, in log power, as the fundamental. Harmonics beyond the grid are reported as 0.
    """
    h = _heights(np.asarray(spectrum, np.float64)[None], np.asarray(freqs, np.float64), f_min)
    peaks = _peak_at(h, freqs, f0 * np.arange(1, harmonics + 1))[0]
    base = peaks[0] if peaks[0] > 0 else 1.0
    return [float(round(p / base, 4)) for p in peaks]


def cluster_cards(
    features: np.ndarray,
    freqs: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray | None = None,
    f_min: float = F_MIN,
) -> list[dict[str, Any]]:
    """One card per cluster ID (novel events, −1, get none), largest cluster first.

    Parameters
    ----------
    features : (events, channels, bins) feature spectra.
    freqs : (bins,) grid frequencies in Hz.
    clusters : (events,) cluster IDs.
    labels : (events,) species names, "" = unlabelled; or None.

    Returns
    -------
    Cards as JSON-ready dicts: ``cluster``, ``size``, ``mean_spectrum`` (channels × bins, rounded),
    ``f0_hz`` (median of the per-event estimates, Hz), ``f0_iqr_hz`` (their 25th and 75th percentiles),
    ``f0_of_mean_hz`` (the estimate on the mean spectrum), ``harmonics`` (relative strengths of harmonics 1…4
    on the mean spectrum, channels averaged) and ``species`` (labelled counts, most first). The four f0 fields
    are None when the mean spectrum has no wing-beat above ``f_min`` (see ``cluster_cards``' body).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != len(freqs):
        raise ValueError(f"features must be (events, channels, {len(freqs)}), got {x.shape}")
    clusters = np.asarray(clusters)
    if len(clusters) != len(x):
        raise ValueError(f"{len(x)} events but {len(clusters)} cluster IDs")
    cards = []
    ids, sizes = np.unique(clusters[clusters >= 0], return_counts=True)
    for ident in ids[np.argsort(-sizes, kind="stable")]:
        m = clusters == ident
        mean = x[m].mean(axis=0)  # (channels, bins)
        per_event = fundamental(x[m].mean(axis=1), freqs, f_min)  # channels averaged: (events,) Hz
        f_mean = float(fundamental(mean.mean(axis=0), freqs, f_min))
        # The mean spectrum's best candidate at the bottom of the search range means its strongest periodicity
        # lies at or below f_min (body power, or a wing-beat too slow for the grid): no f0 is claimed.
        resolved = f_mean > f_min + (freqs[1] - freqs[0])
        card: dict[str, Any] = {
            "cluster": int(ident),
            "size": int(m.sum()),
            "f0_hz": round(float(np.median(per_event)), 2) if resolved else None,
            "f0_iqr_hz": [round(float(q), 2) for q in np.percentile(per_event, [25, 75])] if resolved else None,
            "f0_of_mean_hz": round(f_mean, 2) if resolved else None,
            "harmonics": harmonic_strengths(mean.mean(axis=0), freqs, f_mean, f_min=f_min) if resolved else None,
            "mean_spectrum": np.round(mean, 4).tolist(),
        }
        if labels is not None:
            names, counts = np.unique(np.asarray(labels)[m], return_counts=True)
            card["species"] = {
                str(n): int(c) for n, c in sorted(zip(names, counts, strict=True), key=lambda t: -t[1]) if n != ""
            }
        cards.append(card)
    return cards


def format_cards(cards: list[dict[str, Any]], max_species: int = 3) -> list[str]:
    """The cards as a fixed-width text table, one line per cluster (``wingbeat status``)."""
    lines = [f"{'cluster':>7} {'size':>7}  {'f0 Hz':>7} {'IQR Hz':<15} {'harmonics 1-4':<23} species (labelled)"]
    for c in cards:
        if c["f0_hz"] is None:
            f0, iqr, harm = "-", "below f0 range", "-"
        else:
            f0 = f"{c['f0_hz']:.1f}"
            iqr = f"{c['f0_iqr_hz'][0]:.0f}-{c['f0_iqr_hz'][1]:.0f}"
            harm = " ".join(f"{h:.2f}" for h in c["harmonics"])
        species = c.get("species") or {}
        named = ", ".join(f"{n} {k}" for n, k in list(species.items())[:max_species])
        if len(species) > max_species:
            named += f", +{len(species) - max_species} more"
        lines.append(f"{c['cluster']:>7} {c['size']:>7}  {f0:>7} {iqr:<15} {harm:<23} {named or '-'}".rstrip())
    return lines
