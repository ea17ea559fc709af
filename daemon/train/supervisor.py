"""Training supervision: when to train (``TrainingSchedule``, pure), whether a trained version may serve
(``gate``, pure), and the trainer process (``Trainer``).

The trainer runs in its own process (``daemon.train.trainer``) at the lowest CPU priority (``SCHED_IDLE``), dies with
the daemon (it asks the kernel for ``PR_SET_PDEATHSIG`` itself, then checks that its parent is still the daemon),
gets the daemon's validated configuration (a JSON file it reads back with ``config.from_dict``) and reports on
stdout, one JSON object per line. With ``training.nproc`` > 1 it runs as that many ranks under torchrun.
"""

from __future__ import annotations

import json
import math
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from daemon.ops import logs
from daemon.ops.config import Config
from daemon.ops.config import Training as TrainingConfig
from daemon.ops.metrics import Metrics
from daemon.store.db import Store
from daemon.store.versions import ModelDir
from model.checkpoint import CheckpointError, ModelVersion

RETRAIN_REQUEST = "retrain-request"  # a file in the state directory: ``wingbeat retrain`` asks for a full retrain
MIN_EVENTS = 16  # a training needs at least this many events with features


def gate(metrics: dict[str, Any], rec_tolerance: float, ari_tolerance: float) -> str:
    """Why a new version may not serve ("" = it may): held-out reconstruction and labelled ARI vs its parent."""
    new, old = metrics.get("val_rec"), metrics.get("parent_val_rec")
    if new is None or not math.isfinite(new):
        return "held-out reconstruction error is not finite"
    if old is not None and math.isfinite(old) and new > old * (1 + rec_tolerance):
        return f"held-out reconstruction error {new:.4g} is worse than the serving model's {old:.4g}"
    a_new, a_old = metrics.get("ari"), metrics.get("parent_ari")
    if a_new is not None and a_old is not None and a_new < a_old - ari_tolerance:
        return f"ARI on labelled events {a_new:.3f} is below the serving model's {a_old:.3f}"
    return ""


@dataclass
class TrainingSchedule:
    """When the next training is due, and of which kind. Pure: events and times come in as arguments.

    ``observe`` the stored event count and the outputs served; ``due(now)`` says "first", "finetune", "full" or
    "" (and why, in ``reason``); ``explain(now)`` says in words what comes next.
    """

    cfg: TrainingConfig
    events: int = 0  # stored events
    has_model: bool = False
    train_rec: float = math.nan  # the serving model's training reconstruction error (the drift reference)
    last_events: int = 0  # events stored when the last training started
    last_time: float = 0.0  # monotonic time the last training started (or the schedule began)
    failures: int = 0  # failed trainings in a row
    not_before: float = 0.0  # monotonic time before which nothing starts (backoff after a failure)
    requested: bool = False  # a full retrain asked for (SIGUSR1, ``wingbeat retrain``)
    running: bool = False
    reason: str = ""  # why the last ``due`` said what it said: first, requested, ignored, events, time, drift
    detail: dict[str, Any] = field(default_factory=dict)  # the figures behind ``reason``
    novel: deque[bool] = field(default_factory=deque)
    rec: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.resize()

    def resize(self) -> None:
        """Drift windows of ``cfg.drift_window`` events (after a reload: the newest kept)."""
        n = self.cfg.drift_window
        self.novel, self.rec = deque(self.novel, maxlen=n), deque(self.rec, maxlen=n)

    def observe(self, events: int, novel: list[bool] | None = None, rec: list[float] | None = None) -> None:
        self.events = events
        if novel:
            self.novel.extend(novel)
        if rec:
            self.rec.extend(rec)

    def serving(self, train_rec: float) -> None:
        """A model serves from now (started, restored or swapped in): drift is measured afresh against it."""
        self.has_model, self.train_rec = True, train_rec
        self.novel.clear()
        self.rec.clear()

    def due(self, now: float) -> str:
        t, n = self.cfg, self.events
        self.reason, self.detail = "", {}
        if self.running or now < self.not_before:
            return ""
        if self.requested:
            self.requested = False
            if n >= MIN_EVENTS:
                self.reason = "requested"
                return "full" if self.has_model else "first"
            self.reason, self.detail = "ignored", {"reason": f"only {n} events stored"}
            return ""
        if not self.has_model:
            self.reason = "first"
            return "first" if n >= t.first_after else ""
        since = n - self.last_events
        self.reason, self.detail = "events", {"since_last": since}
        if since >= t.full_every_events:
            return "full"
        if since >= t.finetune_every_events:
            return "finetune"
        self.reason = "time"
        if t.finetune_every_s > 0 and since > 0 and now - self.last_time >= t.finetune_every_s:
            return "finetune"
        self.reason, self.detail = "", {}
        if self.novel.maxlen and len(self.novel) == self.novel.maxlen:
            novel = sum(self.novel) / len(self.novel)
            rec = sum(self.rec) / max(1, len(self.rec))
            drifted = novel > t.drift_novelty or (
                math.isfinite(self.train_rec) and rec > t.drift_rec_ratio * self.train_rec
            )
            if drifted:
                self.reason = "drift"
                self.detail = {"novel_fraction": novel, "rec_error": rec, "training_rec_error": self.train_rec}
                self.novel.clear()
                self.rec.clear()
                return "full"
        return ""

    def started(self, now: float) -> None:
        self.running, self.last_events, self.last_time = True, self.events, now

    def finished(self, ok: bool, now: float) -> float:
        """A training ended; returns the backoff in seconds (0 after a success, doubling up to 1 h)."""
        self.running = False
        if ok:
            self.failures = 0
            return 0.0
        self.failures += 1
        backoff = min(3600.0, self.cfg.backoff_s * 2 ** (self.failures - 1))
        self.not_before = now + backoff
        return backoff

    def explain(self, now: float) -> str:
        t, n = self.cfg, self.events
        if self.running:
            return "running now"
        if not self.has_model:
            return f"first training when {t.first_after} events are stored ({n} now)"
        since = n - self.last_events
        parts = [f"fine-tune in {max(0, t.finetune_every_events - since)} events"]
        if t.finetune_every_s > 0:
            parts.append(f"or {max(0.0, t.finetune_every_s - (now - self.last_time)):.0f} s (with new events)")
        parts.append(f"full retrain in {max(0, t.full_every_events - since)} events, or on drift")
        if now < self.not_before:
            parts.append(f"backing off {self.not_before - now:.0f} s after {self.failures} failures")
        return ", ".join(parts)


@dataclass
class TrainerRun:
    proc: subprocess.Popen[bytes]
    kind: str
    version: int
    started: float
    reports: queue.Queue[dict[str, Any]]
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    readers: list[threading.Thread] = field(default_factory=list)
    done: dict[str, Any] | None = None
    error: str = ""
    config_file: Path | None = None  # removed when the run ends

    def failure(self, code: int) -> str:
        """Why the run failed ("" = it did not)."""
        if code == 0 and self.done is not None:
            return ""
        signal_note = f" (signal {-code})" if code < 0 else ""
        tail = f": {self.stderr_tail[-1]}" if self.stderr_tail else ""
        return self.error or f"trainer exited with {code}{signal_note}{tail}"


class Trainer:
    """Starts ``python -m daemon.train.trainer`` for one version and collects its reports."""

    def start(self, state: str, cfg: Config, kind: str, version: int, parent: str) -> TrainerRun:
        t = cfg.training
        # The same validated configuration the daemon runs with, read back with config.from_dict by every rank;
        # beside the version's other temporary files, so ModelDir.discard removes it with them
        conf = Path(state) / "models" / f".v{version}.config.json"
        conf.write_text(json.dumps(cfg.to_dict()))
        cmd = [sys.executable, "-m"]
        if t.nproc > 1:  # data-parallel: torchrun starts the ranks (gloo on CPUs, NCCL on GPUs)
            cmd += ["torch.distributed.run", "--standalone", f"--nproc-per-node={t.nproc}", "-m"]
        cmd += ["daemon.train.trainer", "--state", state, "--version", str(version), "--kind", kind, "--parent", parent]
        cmd += ["--parent-pid", str(os.getpid()), "--config-file", str(conf)]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(t.threads), "OMP_NUM_THREADS": str(t.threads)}
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the daemon only, which stops the trainer in order
        )
        assert proc.stdout is not None and proc.stderr is not None
        run = TrainerRun(proc, kind, version, time.monotonic(), queue.Queue(), config_file=conf)
        run.readers = [
            threading.Thread(target=_read_reports, args=(proc.stdout, run.reports), daemon=True),
            threading.Thread(target=_read_tail, args=(proc.stderr, run.stderr_tail), daemon=True),
        ]
        for reader in run.readers:
            reader.start()
        return run

    @staticmethod
    def poll(run: TrainerRun) -> tuple[int | None, list[dict[str, Any]]]:
        """(exit code or None while it runs, epoch reports since the last poll); ``done`` and ``error`` reports
        are kept on ``run``."""
        code = run.proc.poll()
        if code is not None:
            for t in run.readers:  # the pipes close at exit; the readers finish with what was left in them
                t.join(timeout=5)
            if run.config_file is not None:
                run.config_file.unlink(missing_ok=True)
        epochs = []
        while True:
            try:
                msg = run.reports.get_nowait()
            except queue.Empty:
                break
            if msg.get("type") == "epoch":
                epochs.append(msg)
            elif msg.get("type") == "done":
                run.done = msg
            elif msg.get("type") == "error":
                run.error = str(msg.get("message", ""))
        return code, epochs

    @staticmethod
    def stop(run: TrainerRun, timeout_s: float = 5.0) -> None:
        run.proc.terminate()
        try:
            run.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait(timeout_s)


Accepted = tuple[ModelVersion, int, str]  # (version, its number, the kind of training)


class Supervisor:
    """Starts trainings when the schedule says so, follows their reports into metrics and logs, and gates what
    they wrote. Owns the trainer run; the service only swaps in what ``step`` accepts."""

    def __init__(self, state: Path, cfg: Config, store: Store, models: ModelDir, metrics: Metrics) -> None:
        self.state, self.cfg, self.store, self.models, self.metrics = state, cfg, store, models, metrics
        self.log = logs.get()
        self.schedule = TrainingSchedule(cfg.training, events=store.count_events(), last_time=time.monotonic())
        self.trainer = Trainer()
        self.run: TrainerRun | None = None

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.schedule.cfg = cfg.training
        self.schedule.resize()  # training.drift_window

    def step(self, now: float, serving: int, unservable: Callable[[ModelVersion], str]) -> Accepted | None:
        """Follow the running training, or start one when due. Returns a version that passed the gate (and
        ``unservable``) for the caller to swap in."""
        if self.run is not None:
            return self._follow(self.run, serving, unservable)
        if (self.state / RETRAIN_REQUEST).exists():
            (self.state / RETRAIN_REQUEST).unlink(missing_ok=True)
            self.schedule.requested = True
        kind = self.schedule.due(now)
        why, detail = self.schedule.reason, self.schedule.detail
        if why == "drift":
            self.log.warning("drift", **detail, model_version=serving)
        elif why == "requested":
            self.log.info("training_requested")
        elif why == "ignored":
            self.log.warning("training_request_ignored", **detail)
        if not kind:
            return None
        version = self.models.claim(kind)
        parent = str(self.models.path(serving)) if serving else ""
        self.run = run = self.trainer.start(str(self.state), self.cfg, kind, version, parent)
        self.schedule.started(now)
        self.metrics.training.set(1)
        self.log.info(
            "training_started",
            kind=kind,
            model_version=version,
            parent=serving or None,
            events=self.schedule.events,
            epochs=self.cfg.training.total_epochs(kind),
            pid=run.proc.pid,
        )
        return None

    def _follow(self, run: TrainerRun, serving: int, unservable: Callable[[ModelVersion], str]) -> Accepted | None:
        code, epochs = self.trainer.poll(run)
        for msg in epochs:
            self.metrics.train_epoch.set(msg.get("epoch", 0))
            self.metrics.train_beta.set(msg.get("beta", 0.0))
            self.metrics.train_gamma.set(msg.get("gamma", 0.0))
            for term in ("rec", "kl", "cls"):
                if isinstance(msg.get(term), int | float):
                    self.metrics.train_loss.labels(term).set(msg[term])
            e, n = int(msg.get("epoch", 0)), int(msg.get("epochs", 0))
            if e % 10 == 0 or e == n - 1:
                self.log.info(
                    "training_epoch",
                    model_version=run.version,
                    kind=run.kind,
                    epoch=e,
                    epochs=n,
                    **{k: msg.get(k) for k in ("beta", "gamma", "rec", "kl")},
                )
        if code is None:
            return None
        self.run = None
        self.metrics.training.set(0)
        seconds = time.monotonic() - run.started
        self.metrics.train_seconds.observe(seconds)
        why = run.failure(code)
        version = None
        if not why:
            try:
                version = self.models.load(run.version)
            except CheckpointError as e:
                self.metrics.models_rejected.labels("unreadable").inc()
                why = f"version unreadable: {e}"
        if version is None:
            backoff = self.schedule.finished(False, time.monotonic())
            self.metrics.train_runs.labels(run.kind, "failed").inc()
            self.metrics.train_failures.set(self.schedule.failures)
            self.log.error(
                "training_failed",
                kind=run.kind,
                model_version=run.version,
                error=why,
                retry_in_s=backoff,
                failures=self.schedule.failures,
            )
            self.models.discard(run.version)
            self._record(run.version, "failed", run.kind, {}, why[:500])  # the number stays used up
            return None
        self.schedule.finished(True, time.monotonic())
        self.metrics.train_failures.set(0)
        metrics = version.manifest.get("gate_metrics", {})
        why = gate(metrics, self.cfg.training.gate_rec_tolerance, self.cfg.training.gate_ari_tolerance)
        why = why or unservable(version)
        if why:
            self.metrics.train_runs.labels(run.kind, "rejected").inc()
            self.metrics.models_rejected.labels("gate").inc()
            self._record(run.version, "rejected", run.kind, metrics, why)
            self.log.warning("model_rejected", model_version=run.version, kind=run.kind, reason=why, serving=serving)
            return None
        self.metrics.train_runs.labels(run.kind, "accepted").inc()
        self.log.info("training_done", model_version=run.version, kind=run.kind, seconds=round(seconds, 1))
        return version, run.version, run.kind

    def _record(self, n: int, status: str, kind: str, metrics: dict[str, Any], reason: str) -> None:
        try:
            self.store.record_model(n, status, kind, metrics, reason)
        except sqlite3.OperationalError as e:
            self.log.error("store_failed", error=str(e), detail=f"model version {n} not recorded as {status}")

    def stop(self) -> None:
        """Stop a running training (the daemon is stopping); its version number stays used up."""
        run, self.run = self.run, None
        if run is None:
            return
        self.trainer.stop(run)
        self.models.discard(run.version)
        self._record(run.version, "failed", run.kind, {}, "stopped with the daemon")
        self.metrics.training.set(0)
        self.log.info("training_stopped", model_version=run.version, kind=run.kind)


def _read_reports(stream: IO[bytes], q: queue.Queue[dict[str, Any]]) -> None:
    for line in stream:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict):
            q.put(msg)


def _read_tail(stream: IO[bytes], tail: deque[str]) -> None:
    for line in stream:
        tail.append(line.decode("utf-8", "replace").rstrip())
