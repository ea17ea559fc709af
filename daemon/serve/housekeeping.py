"""The store's degrade rule, and housekeeping every few seconds: free disk space (raw samples stop being kept
below a floor), retention of raw samples and quarantine rows, store sizes, and the status file that
``wingbeat status`` reads."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from daemon.ops import logs
from daemon.ops.config import Config
from daemon.ops.metrics import Metrics
from daemon.protocol import Event, Output, Quarantined
from daemon.store.db import Store


class Rate:
    """Events per second over the last ``n`` batches."""

    def __init__(self, n: int = 64) -> None:
        self.window: deque[tuple[float, int]] = deque(maxlen=n)

    def add(self, now: float, events: int) -> None:
        self.window.append((now, events))

    def per_s(self) -> float:
        if len(self.window) < 2:
            return 0.0
        span = self.window[-1][0] - self.window[0][0]
        return sum(n for _, n in list(self.window)[1:]) / span if span > 0 else 0.0


# Raw rows dropped with each batch while the store is over its retention limits: twice the batch's events, so that
# retention catches up at any rate, and at least this many (also per idle turn of the loop)
PRUNE_MIN_ROWS = 64


class Housekeeper:
    def __init__(self, state: Path, store: Store, metrics: Metrics) -> None:
        self.state, self.store, self.metrics = state, store, metrics
        self.log = logs.get()
        self.keep_raw = True  # False while the disk is short of space (or a commit failed for it)
        self.retention: tuple[float | None, int | None] = (None, None)  # raw samples: max age (s), max bytes
        self.prune_due = False  # raw samples past a limit remain: the next batch (or idle turn) drops more
        self.carried = False  # a batch dropped raw samples this turn
        self.pruned = 0  # raw rows dropped since the last log line

    def ingest(
        self,
        events: list[Event],
        features: list[np.ndarray],
        quarantine: list[Quarantined],
        outputs: list[Output] | None,
        marks: list[int],
    ) -> list[int]:
        """Store a batch (``Store.ingest``). A failed commit degrades first: raw samples (the first thing to go
        when the disk fills) are no longer kept, and the batch is tried once more without them. Raises when that
        fails too: nothing of the batch is stored."""
        limit = max(PRUNE_MIN_ROWS, 2 * len(events)) if self.prune_due else 0
        due = self.store.raw_cutoff(*self.retention, limit) if limit else (0, 0, 0)
        try:
            ids = self.store.ingest(events, features, quarantine, self.keep_raw, outputs, marks, due)
            self.carried = bool(limit)
            self.pruned += self.store.dropped_raw
            # more is due when this batch dropped all it could, or its own samples took the store past the limit
            over = self.retention[1] is not None and self.store.raw_bytes() > self.retention[1]
            self.prune_due = (bool(due[0]) and self.store.dropped_raw == limit) or over
            return ids
        except sqlite3.OperationalError as err:
            self.metrics.store_errors.labels("ingest").inc()
            if not self.keep_raw:
                raise
            self.keep_raw = False
            self.metrics.raw_paused.set(1)
            self.log.error("store_degraded", error=str(err), detail="raw samples are no longer kept")
        return self.store.ingest(events, features, quarantine, False, outputs, marks)

    def run(self, cfg: Config) -> None:
        s = cfg.store
        try:
            usage = shutil.disk_usage(self.state)
            free = usage.free
            self.metrics.disk_size.set(usage.total)
        except OSError:
            free = 0
        self.metrics.disk_free.set(free)
        self.metrics.raw_limit.set(s.raw_max_bytes)  # here, not at start: a SIGHUP may change them
        self.metrics.min_free.set(s.min_free_bytes)
        want_raw = free >= s.min_free_bytes
        if want_raw != self.keep_raw:
            self.keep_raw = want_raw
            self.metrics.raw_paused.set(0 if want_raw else 1)
            self.log.warning("raw_samples", kept=want_raw, disk_free_bytes=free)
        self.retention = (s.raw_max_age_days * 86400 if s.raw_max_age_days > 0 else None, s.raw_max_bytes)
        try:
            self.prune()
            if self.pruned:
                self.log.info("raw_pruned", events=self.pruned, more=self.prune_due)
                self.pruned = 0
            self.store.prune_quarantine(cfg.ingest.quarantine_keep)
        except sqlite3.OperationalError as e:
            self.metrics.store_errors.labels("retention").inc()
            self.log.error("retention_failed", error=str(e))
        self.metrics.store_bytes.set(self.store.file_bytes())
        self.metrics.raw_bytes.set(self.store.raw_bytes())
        self.metrics.quarantine.set(self.store.quarantine_count())

    def prune_turn(self) -> None:
        """Each turn of the serving loop: while raw samples past a limit remain and no batch dropped some this
        turn, a step of ``PRUNE_MIN_ROWS`` in a transaction of its own."""
        carried, self.carried = self.carried, False
        if not self.prune_due or carried:
            return
        try:
            self.prune()
        except sqlite3.OperationalError as e:
            self.prune_due = False  # the round every few seconds tries again
            self.metrics.store_errors.labels("retention").inc()
            self.log.error("retention_failed", error=str(e))

    def prune(self) -> None:
        """One step of raw-sample retention (``Store.prune_raw``, at most ``PRUNE_MIN_ROWS``); ``prune_due`` says
        whether more is left. Raises ``sqlite3.OperationalError``."""
        dropped = self.store.prune_raw(*self.retention, PRUNE_MIN_ROWS)
        self.pruned += dropped
        self.prune_due = dropped == PRUNE_MIN_ROWS

    def write_endpoints(self, info: dict[str, Any]) -> None:
        """``endpoints.json``: where the daemon listens, ports the OS chose included (``status`` and tests read it)."""
        tmp = self.state / ".endpoints.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.state / "endpoints.json")

    def write_status(
        self, events_per_s: float, serving: int, training: dict[str, Any] | None, next_training: str
    ) -> None:
        """What ``wingbeat status`` shows of the running daemon (the store holds the rest); ``serving`` 0: none."""
        if training is not None:
            training = {**training, "seconds": round(training["seconds"], 1)}
        info = {
            "pid": os.getpid(),
            "updated_ns": time.time_ns(),
            "events_per_s": round(events_per_s, 1),
            "serving": serving or None,
            "training": training,
            "next_training": next_training,
            "raw_kept": self.keep_raw,
        }
        try:
            tmp = self.state / ".daemon-status.json.tmp"
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.state / "daemon-status.json")
        except OSError:
            pass  # a full disk must not stop the loop; the metrics say the same
