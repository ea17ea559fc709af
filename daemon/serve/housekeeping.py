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


class Housekeeper:
    def __init__(self, state: Path, store: Store, metrics: Metrics) -> None:
        self.state, self.store, self.metrics = state, store, metrics
        self.log = logs.get()
        self.keep_raw = True  # False while the disk is short of space (or a commit failed for it)

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
        try:
            return self.store.ingest(events, features, quarantine, self.keep_raw, outputs, marks)
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
        try:
            dropped = self.store.prune_raw(
                s.raw_max_age_days * 86400 if s.raw_max_age_days > 0 else None, s.raw_max_bytes
            )
            if dropped:
                self.log.info("raw_pruned", events=dropped)
            self.store.prune_quarantine(cfg.ingest.quarantine_keep)
        except sqlite3.OperationalError as e:
            self.metrics.store_errors.labels("retention").inc()
            self.log.error("retention_failed", error=str(e))
        self.metrics.store_bytes.set(self.store.file_bytes())
        self.metrics.raw_bytes.set(self.store.raw_bytes())
        self.metrics.quarantine.set(self.store.quarantine_count())

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
