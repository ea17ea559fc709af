"""Diversity per window of event time: the counts come from the store (counted by window and cluster in SQLite,
``daemon.store.labels``), the estimates from ``model.diversity``. A thin shell: rows in, one dict per window out.

A window never mixes model versions silently. By default every event is labelled by the serving version: its own
output where that version served it, else the version's re-labelling of the stored features (``labels``, written
in the background by ``daemon.serve.relabel``). Events it has not re-labelled yet are counted in ``pending`` and
left out of the estimates. With ``as_served`` the published clusters are counted, and ``model_version`` is the one
version that served the window, or the list of them when several did (``served_by`` gives their events).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from daemon.store.db import Store
from daemon.store.labels import WINDOWS, window_filter
from model.cluster import NOVEL

BY = ("hour", "day", "week", "all", "station")
POOLED = "*"  # the station of a ``by="all"`` window that pools several stations' events
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Key = tuple[str, int]  # (station, window number)


def iso(ns: int) -> str:
    """ISO 8601 in UTC, to the microsecond (ns since the epoch)."""
    return (EPOCH + timedelta(microseconds=ns // 1000)).isoformat()


def diversity_windows(
    state: Path,
    by: str,
    *,
    station: str | None = None,
    sensor: str | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    as_served: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One dict per window with stored events, by station and then time.

    ``by``: ``hour``, ``day`` or ``week`` (ISO weeks from Monday), on UTC calendar boundaries, one window per
    station and period; ``all``: one window of every selected event; ``station``: one window per station over the
    whole period. ``since_ns`` / ``until_ns`` (ns since the epoch) bound ``t0_ns`` (from, and before).
    """
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}, got {by!r}")
    where, args = window_filter(station, sensor, since_ns, until_ns)
    per = "station" if by == "all" else by  # "all" pools the stations' rows below
    store = Store(state, readonly=True)
    # the events per window (a scan of the events) on a second connection and core, while the clusters are counted
    pool = ThreadPoolExecutor(1, thread_name_prefix="window-totals")
    totals_of = pool.submit(_totals, state, per, where, args)
    try:
        version = None if as_served else store.serving_version()
        counts: dict[Key, dict[int, int]] = {}
        served: dict[Key, dict[int, int]] = {}
        if as_served:
            for s, w, v, c, n in store.window_counts_served(per, where, args):
                _add(counts, (s, w), c, n)
                _add(served, (s, w), v, n)
        elif version is not None:
            for s, w, c, n in store.window_counts(per, version, where, args):
                _add(counts, (s, w), c, n)
        totals = totals_of.result()
    finally:
        store.close()
        pool.shutdown(wait=True)
    if by == "all" and totals:
        totals, counts, served = _pooled(totals, counts, served)
    out = []
    for key in sorted(totals):
        total, lo, hi = totals[key]
        start, end = _bounds(by, key[1], lo, hi)
        window = window_record(key[0], start, end, total, counts.get(key, {}), seed)
        if as_served:
            versions = served.get(key, {})
            window["model_version"] = _one_or_list(sorted(versions))
            window["served_by"] = {str(v): n for v, n in sorted(versions.items())}
        else:
            window["model_version"] = version
        out.append(window)
    return out


def _totals(state: Path, by: str, where: str, args: list[object]) -> dict[Key, tuple[int, int, int]]:
    store = Store(state, readonly=True)
    try:
        return {(s, w): (n, lo, hi) for s, w, n, lo, hi in store.window_totals(by, where, args)}
    finally:
        store.close()


def _add(table: dict[Key, dict[int, int]], key: Key, what: int, n: int) -> None:
    row = table.setdefault(key, {})
    row[what] = row.get(what, 0) + n


def _pooled(
    totals: dict[Key, tuple[int, int, int]], counts: dict[Key, dict[int, int]], served: dict[Key, dict[int, int]]
) -> tuple[dict[Key, tuple[int, int, int]], dict[Key, dict[int, int]], dict[Key, dict[int, int]]]:
    """The stations' whole-period rows as one window (its station named when there is only one)."""
    stations = sorted({s for s, _ in totals})
    key = (stations[0] if len(stations) == 1 else POOLED, 0)
    total = (
        sum(t[0] for t in totals.values()),
        min(t[1] for t in totals.values()),
        max(t[2] for t in totals.values()),
    )
    merged: dict[Key, dict[int, int]] = {}
    merged_served: dict[Key, dict[int, int]] = {}
    for src, dst in ((counts, merged), (served, merged_served)):
        for row in src.values():
            for what, n in row.items():
                _add(dst, key, what, n)
    return {key: total}, merged, merged_served


def _bounds(by: str, w: int, lo: int, hi: int) -> tuple[str, str]:
    """A calendar window's [start, end); the first and last event's times for ``all`` and ``station``."""
    if by in WINDOWS:
        width, offset = WINDOWS[by]
        start = w * width - offset
        return iso(start), iso(start + width)
    return iso(lo), iso(hi)


def _one_or_list(versions: list[int]) -> int | list[int] | None:
    if not versions:
        return None
    return versions[0] if len(versions) == 1 else versions


def window_record(
    station: str, start: str, end: str, total: int, clusters: dict[int, int], seed: int
) -> dict[str, Any]:
    """One window as ``wingbeat diversity --json`` prints it: ``clusters`` maps cluster (−1 = novel) to events;
    the ``total`` events it did not count are ``pending``."""
    clusters = dict(clusters)
    novel = clusters.pop(NOVEL, 0)
    labelled = novel + sum(clusters.values())
    abundance = {str(c): n for c, n in sorted(clusters.items())}
    return {
        "station": station,
        "start": start,
        "end": end,
        "events": labelled,
        "novel": novel,
        "pending": total - labelled,
        "model_version": None,
        "abundance": abundance,
        **summary(np.array(list(abundance.values()), np.int64), seed),
    }


def summary(counts: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """observed (of the clusters present) / estimated / ci95 / coverage / stray of abundances ``counts``
    (clusters,), ``model.diversity.window_summary``; zeros and no coverage when nothing was counted."""
    if counts.sum() == 0:
        zero = {f"q{q}": 0.0 for q in (0, 1, 2)}
        return {
            "observed": zero,
            "estimated": dict(zero),
            "ci95": {k: [0.0, 0.0] for k in zero},
            "coverage": None,
            "stray": 0,
        }
    from model.diversity import window_summary

    return window_summary(counts, seed=seed)


def network(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """The network of ``by="station"`` windows: gamma, mean alpha and multiplicative beta (Jost 2007) for q = 0,
    1, 2, and the station × station Bray–Curtis and Sørensen dissimilarities of their abundances."""
    from model.diversity import beta_multiplicative, dissimilarity

    stations = [w["station"] for w in windows]
    clusters = sorted({int(c) for w in windows for c in w["abundance"]})
    table = np.array([[w["abundance"].get(str(c), 0) for c in clusters] for w in windows], np.int64)
    out: dict[str, Any] = {"stations": stations, "clusters": clusters}
    parts: dict[str, dict[str, float]] = {}
    for q in (0, 1, 2):
        for name, value in beta_multiplicative(table, q).items():  # gamma, alpha, beta
            parts.setdefault(name, {})[f"q{q}"] = float(value)
    out.update(parts)
    for metric in ("bray_curtis", "sorensen"):
        out[metric] = np.asarray(dissimilarity(table, metric), float).round(6).tolist()
    return {"network": out}
