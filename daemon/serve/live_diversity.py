"""Live diversity (docs/diversity.md): the published outputs' cluster abundances over rolling windows of the last
hour and day, as Prometheus gauges, and a summary at each close of a UTC calendar window.

Windows run by **wall-clock arrival time**, not event time: a live panel shows what the daemon heard recently, a
replay of an old recording shows up now, and a sensor with a wrong clock cannot put events into a window that
closed already. ``wingbeat diversity`` reads the store by event time; for live sensors the two agree.

The state is explicit and bounded: per-minute buckets of counts per cluster for the last 24 h (at most 1,440
buckets of at most one count per served cluster, whatever the event rate), two running totals kept up to date as
buckets enter and leave, and the open summary windows. ``add`` takes a batch's counts (the publisher counts them
anyway), ``refresh`` (from housekeeping, every few seconds) expires buckets, sets the gauges and returns the
summaries of the windows that closed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon.ops.config import Diversity as DiversityConfig
from daemon.ops.metrics import Metrics
from daemon.report.windows import iso, window_record
from model.cluster import NOVEL
from model.diversity import Q, estimated, observed, present, sample_coverage

WINDOWS = {"1h": 3600, "24h": 86400}  # rolling windows of the gauges: label → seconds
BUCKET_S = 60
DAY_S = 86400

Counts = dict[int, int]  # cluster ID (NOVEL = −1 included) → events


def _add(into: Counts, counts: Counts, sign: int = 1) -> None:
    for c, n in counts.items():
        left = into.get(c, 0) + sign * n
        if left:
            into[c] = left
        else:
            into.pop(c, None)


@dataclass
class Rolling:
    """Counts of the last ``width_s`` seconds: buckets (shared with the other windows, newest last) and their sum."""

    width_s: int
    buckets: deque[tuple[int, Counts]] = field(default_factory=deque)  # (bucket number, counts)
    total: Counts = field(default_factory=dict)

    def expire(self, now_bucket: int) -> None:
        first = now_bucket - self.width_s // BUCKET_S + 1  # the oldest bucket still inside the window
        while self.buckets and self.buckets[0][0] < first:
            _add(self.total, self.buckets.popleft()[1], -1)

    def recount(self) -> None:
        self.total = {}
        for _, counts in self.buckets:
            _add(self.total, counts)


@dataclass
class Open:
    """A summary window not closed yet: UTC calendar window ``number`` of ``period_s`` seconds."""

    period_s: int
    number: int
    counts: Counts = field(default_factory=dict)
    versions: set[int] = field(default_factory=set)


class LiveDiversity:
    """The rolling windows and the open summary windows of one daemon."""

    def __init__(self, cfg: DiversityConfig, metrics: Metrics, station: str = "", seed: int = 0) -> None:
        self.metrics, self.station, self.seed = metrics, station, seed
        self.topic = f"diversity.{station or 'local'}"
        self.rolling = {w: Rolling(s) for w, s in WINDOWS.items()}
        self.last_bucket = 0
        self.periods = [cfg.summary_every_s] + ([DAY_S] if cfg.summary_day and cfg.summary_every_s != DAY_S else [])
        self.open: dict[int, Open] = {}
        self.served: set[int] = set()  # the serving version's clusters
        self.known: set[int] = set()  # every cluster a version served in this process
        self.closed: list[dict[str, Any]] = []  # summaries of closed windows, not yet handed out
        for w in WINDOWS:
            for q in Q:
                metrics.diversity.labels(q[1:], w)
                metrics.diversity_estimated.labels(q[1:], w)
            metrics.coverage.labels(w).set(math.nan)
            metrics.window_novel.labels(w)

    # ---- from the publisher, per batch -------------------------------------------------------------------------
    def add(self, counts: Counts, versions: set[int], now: float) -> None:
        """A published batch: events per cluster (NOVEL included), the versions that labelled them, at ``now``
        (s since the epoch). Clusters the serving version does not have are left out of the gauges (an older
        version's output published late), not out of the summaries, which report what was published."""
        self._close(now)
        for w in self.open.values():
            _add(w.counts, counts)
            w.versions |= versions
        live = {c: n for c, n in counts.items() if c in self.served or c == NOVEL}
        b = max(int(now // BUCKET_S), self.last_bucket)  # a clock stepping back adds to the newest bucket
        if not live:
            return
        newest = self.rolling["24h"].buckets
        if newest and newest[-1][0] == b:
            _add(newest[-1][1], live)  # the same dict in every window's deque
        else:
            bucket = (b, dict(live))
            for r in self.rolling.values():
                r.buckets.append(bucket)
        for r in self.rolling.values():
            _add(r.total, live)
        self.last_bucket = b

    def serving(self, ids: list[int]) -> None:
        """A version starts serving with clusters ``ids``: the gauges' labels follow its clusters (stale label
        sets removed, so labels stay bounded), counts of clusters it does not have leave the rolling windows, and
        clusters no earlier version had are counted as new (not for the first version)."""
        new = set(ids) - self.known if self.known else set()
        if new:
            self.metrics.new_clusters.inc(len(new))
        for c in self.served - set(ids):
            for w in WINDOWS:
                self.metrics.abundance.remove(str(c), w)
        self.served = set(ids)
        self.known |= self.served
        for _, counts in self.rolling["24h"].buckets:  # every bucket of the 1 h window is in the 24 h one
            for c in [c for c in counts if c != NOVEL and c not in self.served]:
                del counts[c]
        for r in self.rolling.values():
            r.recount()
        for c in self.served:
            for w in WINDOWS:
                self.metrics.abundance.labels(str(c), w)

    # ---- from housekeeping, every few seconds ------------------------------------------------------------------
    def refresh(self, now: float) -> list[dict[str, Any]]:
        """Expire buckets, set the gauges (observed and estimated Hill numbers, coverage, abundances, novel) and
        return the summaries of the windows closed since the last call."""
        self._close(now)
        b = max(int(now // BUCKET_S), self.last_bucket)
        m = self.metrics
        for w, r in self.rolling.items():
            r.expire(b)
            x = np.array([r.total.get(c, 0) for c in sorted(self.served)], np.int64)
            obs, est = observed(present(x)), estimated(x)  # as ``wingbeat diversity`` counts a window
            for q in Q:
                m.diversity.labels(q[1:], w).set(obs[q])
                m.diversity_estimated.labels(q[1:], w).set(est[q])
            m.coverage.labels(w).set(sample_coverage(x) if x.sum() else math.nan)
            for c, n in zip(sorted(self.served), x.tolist(), strict=True):
                m.abundance.labels(str(c), w).set(n)
            m.window_novel.labels(w).set(r.total.get(NOVEL, 0))
        closed, self.closed = self.closed, []
        return closed

    def _close(self, now: float) -> None:
        """Close the summary windows ``now`` is past (those with events make a summary) and open the current ones."""
        for p in self.periods:
            number = int(now // p)
            w = self.open.get(p)
            if w is not None and w.number >= number:
                continue  # still open (or the clock stepped back: it stays open)
            if w is not None and w.counts:
                self.closed.append(self._summary(w))
            self.open[p] = Open(p, number)

    def _summary(self, w: Open) -> dict[str, Any]:
        """As a ``wingbeat diversity --json`` window (as served), plus ``window_s``."""
        versions = sorted(w.versions)
        start_ns = w.number * w.period_s * 1_000_000_000
        end = iso(start_ns + w.period_s * 1_000_000_000)
        out = window_record(self.station, iso(start_ns), end, sum(w.counts.values()), w.counts, self.seed)
        out["model_version"] = (versions[0] if len(versions) == 1 else versions) if versions else None
        return {**out, "window_s": w.period_s}
