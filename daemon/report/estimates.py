"""The diversity figures the report draws, from ``model.diversity`` (iNEXT's estimators): Hill numbers per day with
their bootstrap 95 % intervals, the rarefaction / extrapolation curve of the whole period, and the stations'
dissimilarity. Counts in (the page's own, so that every figure of a page counts the same events), JSON-ready
dicts out."""

from __future__ import annotations

from typing import Any

import numpy as np

from model.diversity import dissimilarity, rarefaction_curve, window_summary

ORDERS = ("q0", "q1", "q2")


def day_windows(counts: np.ndarray, days: list[str], seed: int = 0) -> list[dict[str, Any]]:
    """One dict per day: ``day``, ``events``, ``observed`` (of the clusters present), ``estimated``, ``ci95``
    ({q: [lo, hi]}), ``coverage`` (None where unknown) and ``stray`` (``model.diversity.window_summary``).

    Parameters
    ----------
    counts : (days, clusters) events per day and cluster, novel events left out.
    days : (days,) labels.
    """
    out = []
    for day, x in zip(days, np.asarray(counts, np.int64), strict=True):
        if x.sum() == 0:
            zero = dict.fromkeys(ORDERS, 0.0)
            figures: dict[str, Any] = {"observed": zero, "estimated": zero, "ci95": {}, "coverage": None, "stray": 0}
        else:
            figures = window_summary(x, seed=seed)
        out.append({"day": day, "events": int(x.sum()), **figures})
    return out


def rarefied(x: np.ndarray, points: int = 40) -> dict[str, Any]:
    """Hill numbers q = 0, 1, 2 against sample size, from 1 event to twice the ``n`` observed: rarefied below
    ``n``, extrapolated above (Chao et al. 2014). ``sizes`` (points,), ``q0``, ``q1``, ``q2`` (points,) and
    ``observed_size`` = n."""
    x = np.asarray(x, np.int64)
    n = int(x.sum())
    sizes = np.unique(np.concatenate([np.linspace(1, 2 * n, points).round().astype(int), [n]]))
    rows = rarefaction_curve(x, sizes)
    return {
        "sizes": np.array([r["m"] for r in rows]),
        **{q: np.array([r[q] for r in rows], float) for q in ORDERS},
        "observed_size": n,
    }


def station_dissimilarity(table: np.ndarray) -> tuple[np.ndarray, str]:
    """(stations, stations) Bray–Curtis dissimilarity of the stations' cluster counts ``table`` (stations,
    clusters), and the measure's name."""
    return np.asarray(dissimilarity(table, "bray_curtis"), float), "Bray–Curtis dissimilarity"
