"""``wingbeat run``: the serving loop (DESIGN §1, §2, §5–§7).

One loop, micro-batches: receive → decode → featurise → commit (events, features, raw, quarantine) → ack →
encode and cluster everything without an output, oldest first → commit outputs → publish. Training runs in a
child process (``daemon.trainer``); the loop reads its reports, gates the version it wrote and swaps it in
between batches. Signals only set flags; the loop acts on them.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon import logs
from daemon.config import Config
from daemon.faults import crash_point
from daemon.metrics import Metrics, MetricsServer
from daemon.protocol import Event, Limits, Reject, decode_ingest, encode_ack, encode_output
from daemon.security import Guard
from daemon.store import NewEvent, Output, Store
from daemon.versions import read_version
from model.checkpoint import CheckpointError, ModelVersion
from model.cluster import NOVEL
from model.predict import Prediction, predict
from model.spectra import FeatureConfig, featurise_events

RETRAIN_REQUEST = "retrain-request"
VERSION_DIR = re.compile(r"v(\d+)")
SPLIT_FROM = 32  # events in a batch from which featurising is split over the featurise threads
# Keys a SIGHUP may change; everything else needs a restart.
RELOADABLE = ("training", "store", "ingest.batch_max", "ingest.batch_wait_ms", "ingest.quarantine_keep")


def sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) how we are; a no-op outside systemd. Abstract sockets start with '@'."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError:
        pass


def watchdog_interval(env: dict[str, str] | os._Environ[str], pid: int, default_s: float = 2.0) -> float:
    """Seconds between ``WATCHDOG=1``: half of systemd's ``WATCHDOG_USEC`` when it is meant for this process
    (``WATCHDOG_PID`` unset or ``pid``), else ``default_s``."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return default_s
    if usec <= 0 or env.get("WATCHDOG_PID", str(pid)) != str(pid):
        return default_s
    return usec / 2e6


@dataclass
class Received:
    frames: list[bytes]
    identity: bytes | None  # ROUTER peer to ack, None for the plain endpoint
    t: float  # monotonic receive time
    endpoint: str


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


def gate(metrics: dict[str, Any], rec_tolerance: float, ari_tolerance: float) -> str:
    """Why a new version may not serve ("" = it may): held-out reconstruction and labelled ARI vs its parent."""
    new, old = metrics.get("val_rec"), metrics.get("parent_val_rec")
    if new is None or not np.isfinite(new):
        return "held-out reconstruction error is not finite"
    if old is not None and np.isfinite(old) and new > old * (1 + rec_tolerance):
        return f"held-out reconstruction error {new:.4g} is worse than the serving model's {old:.4g}"
    a_new, a_old = metrics.get("ari"), metrics.get("parent_ari")
    if a_new is not None and a_old is not None and a_new < a_old - ari_tolerance:
        return f"ARI on labelled events {a_new:.3f} is below the serving model's {a_old:.3f}"
    return ""


@dataclass
class Job:
    """A received micro-batch on its way through the loop: decoded now, featurised (in the featurise threads
    when there are any), then committed, acked and published in arrival order."""

    batch: list[Received]
    events: list[tuple[Received, Event]]
    rejects: list[tuple[Received, Reject]]
    duplicates: list[tuple[Received, Event]]
    features: list[Future[tuple[dict[int, np.ndarray], dict[int, str]]]]  # one per part of the batch

    def result(self) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        feats: dict[int, np.ndarray] = {}
        bad: dict[int, str] = {}
        for f in self.features:
            a, b = f.result()
            feats.update(a)
            bad.update(b)
        return feats, bad


def featurise_batch(
    events: list[tuple[Received, Event]], cfg: FeatureConfig, lo: int, hi: int
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Features of events ``lo``…``hi``−1 of a batch by index, and why the others have none. Pure: runs in a
    featurise thread."""
    feats: dict[int, np.ndarray] = {}
    bad: dict[int, str] = {}
    by_channels: dict[int, list[int]] = {}  # one call per channel count
    for i in range(lo, hi):
        by_channels.setdefault(events[i][1].channels, []).append(i)
    for idx in by_channels.values():
        fb = featurise_events([events[i][1].samples for i in idx], [events[i][1].fs for i in idx], cfg)
        for row, i in enumerate(idx):
            if fb.ok[row]:
                feats[i] = fb.features[row]
            else:
                bad[i] = str(fb.errors[row])
    return feats, bad


class Service:
    def __init__(self, cfg: Config, config_path: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._overrides = overrides or {}  # command-line flags: they win over the file on reload too
        self.log = logs.get()
        self.state = Path(cfg.state_dir)
        self.models_dir = self.state / "models"
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state, checkpoint_every_s=0.1)
        if self.store.migrated:
            old, backup = self.store.migrated
            self.log.warning(
                "store_migrated", from_schema=old, to_schema=self.store.schema_version(), backup=str(backup)
            )
        self.metrics = Metrics(cfg.metrics.max_sensors)
        self.features = FeatureConfig()
        self.limits = Limits(
            max_channels=cfg.ingest.max_channels,
            min_samples=cfg.ingest.min_samples,
            max_message_bytes=cfg.ingest.max_message_bytes,
        )
        self.model: ModelVersion | None = None
        self.version = 0
        self.trainer: TrainerRun | None = None
        self.failures = 0
        self.next_training_at = 0.0  # monotonic time before which no training starts (backoff)
        self.last_training_events = 0
        self.last_training_time = time.monotonic()
        self.recent_novel: deque[bool] = deque(maxlen=cfg.training.drift_window)
        self.recent_rec: deque[float] = deque(maxlen=cfg.training.drift_window)
        self.n_events = self.store.count_events()  # kept up to date here: count(*) scans the table
        self.last_seq: dict[str, int] = {
            s: q for s, q in self.store.db.execute("SELECT sensor, max(seq) FROM events GROUP BY sensor")
        }
        self.received_at: dict[tuple[str, int], float] = {}
        self.to_mark: list[int] = []
        self.outq: deque[dict[str, Any]] = deque()  # outputs to publish, oldest first
        self.queued_id = 0  # the newest event ID ever put in outq
        self.publish_from = 0.0  # monotonic time from which outputs go out (set at bind)
        self.dropped_log = logs.RateLimited(10.0)
        self.keep_raw = True
        self.stop = False
        self.reload = False
        self.retrain = False
        self.events_window: deque[tuple[float, int]] = deque(maxlen=64)
        self.last_housekeeping = 0.0
        self.watchdog_every = watchdog_interval(os.environ, os.getpid())  # seconds between WATCHDOG=1
        self.last_watchdog = 0.0
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []
        self.guard: Guard | None = None
        self.refused_log = logs.RateLimited(10.0)
        self.metrics_server: MetricsServer | None = None
        self.ack_counters: dict[str, Any] = {}  # wingbeat_acks_total by status, looked up once
        self.jobs: deque[Job] = deque()  # received batches not yet committed, oldest first
        # Threads for Welch only (numpy and scipy.fft release the GIL): batch N+1 is featurised, split in
        # ``ingest.featurise_threads`` parts, while batch N commits. Every library call still runs on one thread
        # (OPENBLAS_NUM_THREADS=1, torch.set_num_threads(1)); 0 featurises on the serving thread.
        n = cfg.ingest.featurise_threads
        self.featuriser = ThreadPoolExecutor(n, thread_name_prefix="featurise") if n > 0 else None

    # ---- start-up -----------------------------------------------------------------------------------------
    def bind(self) -> None:
        c = self.cfg
        if c.security.curve:  # before any socket: a bad key is a start-up error, said in one line
            self.guard = Guard(self.ctx, c.security.server_secret_key, c.security.clients_dir, self._refused)
            self.guard.start()
        self.router = self.ctx.socket(zmq.ROUTER)
        # ZeroMQ's own cap is a wall above the configured one: messages between the two reach the decoder and are
        # rejected and counted as "oversize"; beyond the wall ZeroMQ drops the connection before reading them
        wall = 2 * c.ingest.max_message_bytes + 65_536
        self.router.setsockopt(zmq.MAXMSGSIZE, wall)
        self.router.setsockopt(zmq.RCVHWM, c.ingest.queue_per_sender)
        self.router.setsockopt(zmq.LINGER, 0)
        self._secure(self.router, "ingest", c.ingest.endpoint)
        self.router.bind(c.ingest.endpoint)
        self.sockets.append(self.router)
        self.pull: zmq.Socket[bytes] | None = None
        if c.ingest.plain_endpoint:
            self.pull = self.ctx.socket(zmq.PULL)
            self.pull.setsockopt(zmq.MAXMSGSIZE, wall)
            self.pull.setsockopt(zmq.RCVHWM, c.ingest.queue_per_sender)
            self.pull.setsockopt(zmq.LINGER, 0)
            self._secure(self.pull, "ingest_plain", c.ingest.plain_endpoint)
            self.pull.bind(c.ingest.plain_endpoint)
            self.sockets.append(self.pull)
        # XPUB that never drops silently: a send fails while any subscriber's queue is full, and the output waits in
        # self.outq (bounded; what overflows is counted); heartbeats cut subscribers that stopped answering
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, c.publish.hwm)
        self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        if c.publish.sndbuf_bytes:
            self.pub.setsockopt(zmq.SNDBUF, c.publish.sndbuf_bytes)
        self.pub.setsockopt(zmq.LINGER, 2000)
        if c.publish.heartbeat_s > 0:
            self.pub.setsockopt(zmq.HEARTBEAT_IVL, int(c.publish.heartbeat_s * 1000))
            self.pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * c.publish.heartbeat_s * 1000))
        self._secure(self.pub, "publish", c.publish.endpoint)
        self.pub.bind(c.publish.endpoint)
        # subscribers of the process before a restart reconnect within ZeroMQ's reconnect interval (0.1 s by
        # default): publishing at once would give them nothing of what is republished first
        self.publish_from = time.monotonic() + c.publish.start_grace_s
        self.sockets.append(self.pub)
        if c.metrics.listen:
            host, _, port = c.metrics.listen.rpartition(":")
            self.metrics_server = MetricsServer(self.metrics, host.strip("[]"), int(port))
            self.metrics_server.start()
        self._write_endpoints()

    def _secure(self, sock: zmq.Socket[bytes], name: str, endpoint: str) -> None:
        if self.guard is not None:
            self.guard.secure(sock, name)
            return
        if not _loopback(endpoint):
            self.log.warning(
                "insecure_endpoint",
                socket=name,
                endpoint=endpoint,
                detail="reachable beyond this host without CURVE: anyone who can connect can send or read; "
                "see docs/security.md",
            )

    def _refused(self, name: str, reason: str, n: int) -> None:
        self.metrics.refused.labels(name, reason).inc(n)
        due = self.refused_log.due((name, reason), n)
        if due:
            self.log.warning("connection_refused", socket=name, reason=reason, count=due)

    def _write_endpoints(self) -> None:
        """Log the bound addresses (ports chosen by the OS included) and write them for ``status`` and tests."""
        info = {
            "pid": os.getpid(),
            "ingest": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            "ingest_plain": self.pull.getsockopt_string(zmq.LAST_ENDPOINT) if self.pull else "",
            "publish": self.pub.getsockopt_string(zmq.LAST_ENDPOINT),
            "metrics": f"{self.cfg.metrics.listen.rpartition(':')[0]}:{self.metrics_server.port}"
            if self.metrics_server
            else "",
        }
        self.log.info("listening", state=str(self.state), **info)
        tmp = self.state / ".endpoints.json.tmp"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.state / "endpoints.json")

    def load_initial_model(self) -> None:
        """``--model`` if given (imported as the next version), else the newest version in the state that loads."""
        for left in self.models_dir.glob(".v*"):  # half-written by a process killed before its rename
            shutil.rmtree(left, ignore_errors=True)
            self.log.warning("removed_partial_model", path=str(left))
        if self.cfg.model:
            version = read_version(self.cfg.model)  # a bad --model is a start-up error, said in one line
            n = self._next_version()
            shutil.copytree(self.cfg.model, self.models_dir / f".v{n}.import", dirs_exist_ok=True)
            os.replace(self.models_dir / f".v{n}.import", self.models_dir / f"v{n}")
            self._swap(version, n, "imported", {"source": str(self.cfg.model)})
            return
        serving = [m["version"] for m in self.store.models() if m["status"] in ("serving", "retired")]
        for n in sorted(serving, reverse=True):
            try:
                version = read_version(self.models_dir / f"v{n}")
            except CheckpointError as e:
                self.metrics.models_rejected.labels("unreadable").inc()
                self.log.error("model_unreadable", model_version=n, error=str(e))
                continue
            self._swap(version, n, "restored", {})
            return
        self.log.info(
            "no_model",
            detail="events are stored; outputs start when a first model is trained",
            first_training_after=self.cfg.training.first_after,
        )

    def _next_version(self) -> int:
        on_disk = [int(m.group(1)) for p in self.models_dir.iterdir() if (m := VERSION_DIR.fullmatch(p.name))]
        recorded = [m["version"] for m in self.store.models()]
        return max([0, *on_disk, *recorded]) + 1

    def _swap(self, version: ModelVersion, n: int, why: str, extra: dict[str, Any]) -> None:
        self.model, self.version = version, n
        crash_point("swap")  # the new version is on disk and in memory, not yet recorded as serving
        gm = version.manifest.get("gate_metrics", {})
        self.store.record_model(n, "serving", version.manifest.get("kind", why), {**gm, **extra})
        self.metrics.model_version.set(n)
        self.metrics.model_age.set(time.time())
        self.metrics.clusters.set(version.clusterer.k)
        for cid in [NOVEL, *version.clusterer.ids.tolist()]:  # at 0 before their first output: rate() counts it
            self.metrics.per_cluster.labels(str(cid))
        self.metrics.beta.set(float(version.manifest.get("beta_schedule", {}).get("beta", 0.0)))
        self.recent_novel.clear()
        self.recent_rec.clear()
        self.log.info(
            "model_serving",
            model_version=n,
            how=why,
            clusters=version.clusterer.k,
            cluster_ids=version.clusterer.ids.tolist(),
            **{k: v for k, v in gm.items() if k != "device"},
        )

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self.bind()
        self.load_initial_model()
        self.last_training_events = self.n_events if self.model else 0
        self._republish()
        sd_notify("READY=1\nSTATUS=" + self._status_line())  # sockets bound, model (if any) loaded
        self.log.info(
            "ready",
            model_version=self.version or None,
            events=self.n_events,
            watchdog_s=self.watchdog_every if os.environ.get("NOTIFY_SOCKET") else None,
        )
        poller = zmq.Poller()
        for s in (self.router, self.pull):
            if s is not None:
                poller.register(s, zmq.POLLIN)
        try:
            while not self.stop:
                # Two stages: while batch N commits, acks and publishes here, batch N+1 is featurised in the
                # featurise threads. One receive and one commit per turn, so batches keep their size: what came
                # in during a commit is the next batch. With a batch in flight, take only what is queued now;
                # with nothing more queued, commit at once (no reason to wait for the next batch).
                batch = self._receive(poller, 0, linger=False) if self.jobs else self._receive(poller, 100)
                if batch:
                    self.jobs.append(self._prepare(batch))
                if self.jobs and (len(self.jobs) > 1 or not batch or not poller.poll(0)):
                    self._commit(self.jobs.popleft())
                self._serve_pending()
                self._trainer_step()
                self._housekeeping()
                if self.reload:
                    self._reload()
            while self.jobs:  # received before the stop: commit and ack them
                self._commit(self.jobs.popleft())
        finally:
            self._shutdown()
        return 0

    def _install_signals(self) -> None:
        def stop(signum: int, _: Any) -> None:
            self.stop = True

        def hup(signum: int, _: Any) -> None:
            self.reload = True

        def usr1(signum: int, _: Any) -> None:
            self.retrain = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)
        signal.signal(signal.SIGUSR1, usr1)

    def _receive(self, poller: zmq.Poller, timeout_ms: int, linger: bool = True) -> list[Received]:
        """Up to ``ingest.batch_max`` messages: wait ``timeout_ms`` for the first, then up to
        ``ingest.batch_wait_ms`` for more (``linger``) or only what is queued already."""
        ready = dict(poller.poll(timeout_ms))
        if not ready:
            return []
        out: list[Received] = []
        deadline = time.monotonic() + (self.cfg.ingest.batch_wait_ms / 1000 if linger else 0.0)
        while len(out) < self.cfg.ingest.batch_max:
            got = False
            for sock, name in ((self.router, "ack"), (self.pull, "plain")):
                if sock is None:
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                got = True
                now = time.monotonic()
                if name == "ack":
                    out.append(Received(frames[1:], frames[0], now, name))
                else:
                    out.append(Received(frames, None, now, name))
                self.metrics.received.labels(name).inc()
            if not got:
                if time.monotonic() >= deadline:
                    break
                if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                    break
        return out

    def _prepare(self, batch: list[Received]) -> Job:
        """Decode a batch and start featurising it (in the featurise threads when there are any)."""
        decoded: list[tuple[Received, Event | Reject]] = [(r, decode_ingest(r.frames, self.limits)) for r in batch]
        seen: set[tuple[str, int]] = set()
        events: list[tuple[Received, Event]] = []
        rejects: list[tuple[Received, Reject]] = []
        duplicates: list[tuple[Received, Event]] = []
        for r, d in decoded:
            if isinstance(d, Reject):
                rejects.append((r, d))
            elif (d.sensor, d.seq) in seen:
                duplicates.append((r, d))
            else:
                seen.add((d.sensor, d.seq))
                events.append((r, d))
        # A small batch with nothing in flight (light load) is featurised here: handing it to a thread and back
        # only adds latency. Under load batches grow, and the threads take them.
        if self.featuriser is not None and (len(events) >= SPLIT_FROM or self.jobs):
            parts = self.cfg.ingest.featurise_threads if len(events) >= SPLIT_FROM else 1  # one part per thread
            cut = [len(events) * k // parts for k in range(parts + 1)]
            features = [
                self.featuriser.submit(featurise_batch, events, self.features, cut[k], cut[k + 1]) for k in range(parts)
            ]
        else:
            done: Future[tuple[dict[int, np.ndarray], dict[int, str]]] = Future()
            done.set_result(featurise_batch(events, self.features, 0, len(events)))
            features = [done]
        return Job(batch, events, rejects, duplicates, features)

    def _commit(self, job: Job) -> None:
        """Store a featurised batch in one transaction, then ack it and publish its outputs."""
        batch, events, rejects, duplicates = job.batch, job.events, job.rejects, job.duplicates
        feats, bad = job.result()
        keep: list[tuple[Received, Event]] = []
        keep_feats: list[np.ndarray] = []
        for i, (r, e) in enumerate(events):
            if i in bad:
                rejects.append((r, Reject("featurise", bad[i].split(": ", 1)[-1], e.sensor, e.seq)))
            else:
                keep.append((r, e))
                keep_feats.append(feats[i])
        new = [
            NewEvent(
                e.sensor,
                e.seq,
                e.t0_ns,
                e.fs,
                e.dtype,
                e.channels,
                int(e.samples.shape[1]),
                e.label,
                e.meta,
                e.samples.tobytes(),
                f,
            )
            for (_, e), f in zip(keep, keep_feats, strict=True)
        ]
        cap = self.cfg.ingest.quarantine_frame_bytes
        quarantine = [
            (j.reason, j.detail, j.sensor, j.seq, b"\x00".join(f[:cap] for f in r.frames)[:cap], r.endpoint)
            for r, j in rejects
        ]
        inline = self._predict_inline(new)
        marking = self.to_mark if inline is not None else None
        crash_point("before_commit")
        try:
            ids = self.store.ingest(new, quarantine, self.keep_raw, inline, marking)
        except sqlite3.OperationalError as err:
            self.metrics.store_errors.labels("ingest").inc()
            if self.keep_raw:
                self.keep_raw = False  # degrade first: stop keeping raw samples, then try once more
                self.metrics.raw_paused.set(1)
                self.log.error("store_degraded", error=str(err), detail="raw samples are no longer kept")
                try:
                    ids = self.store.ingest(new, quarantine, False, inline, marking)
                except sqlite3.OperationalError as e2:
                    self.log.error("store_failed", error=str(e2), events=len(new), detail="not acked; senders resend")
                    return
            else:
                self.log.error("store_failed", error=str(err), events=len(new), detail="not acked; senders resend")
                time.sleep(0.2)
                return
        crash_point("after_commit")  # committed, nothing acked or published yet
        if marking is not None:
            self.to_mark = []
        now = time.monotonic()
        for r, j in rejects:
            self.metrics.rejected.labels(j.reason).inc()
            self.log.warning(
                "rejected", reason=j.reason, detail=j.detail, sensor=j.sensor, seq=j.seq, endpoint=r.endpoint
            )
            self._ack(r, j.sensor, j.seq, "rejected", j.reason)
        stored: dict[str, int] = {}  # per sensor label: metrics once per batch, not once per event
        for (r, e), eid in zip(keep, ids, strict=True):
            if eid < 0:
                duplicates.append((r, e))
                continue
            self.n_events += 1
            s = self.metrics.sensor(e.sensor)
            stored[s] = stored.get(s, 0) + 1
            last = self.last_seq.get(e.sensor)
            if last is not None and e.seq > last + 1:
                self.metrics.gaps.labels(s).inc(e.seq - last - 1)
                self.log.warning("sequence_gap", sensor=e.sensor, seq=e.seq, missing=e.seq - last - 1)
            if last is None or e.seq > last:
                self.last_seq[e.sensor] = e.seq
            self.received_at[(e.sensor, e.seq)] = r.t
            self._ack(r, e.sensor, e.seq, "stored")
            self.metrics.ack_latency.observe(now - r.t)
        wall = time.time()
        for s, n in stored.items():
            self.metrics.stored.labels(s).inc(n)
            self.metrics.last_event.labels(s).set(wall)
        for r, e in duplicates:
            self.metrics.duplicates.inc()
            self._ack(r, e.sensor, e.seq, "duplicate")
        self.metrics.batch.observe(len(batch))
        self.events_window.append((now, len(new)))
        if inline is not None:  # stored with the events: publish now, no second commit, no read-back
            rows: list[dict[str, Any]] = [
                {
                    "event_id": eid,
                    "sensor": e.sensor,
                    "seq": e.seq,
                    "t0_ns": e.t0_ns,
                    "latent": o.latent,
                    "cluster": o.cluster,
                    "probability": o.probability,
                    "novelty": o.novelty,
                    "model_version": o.model_version,
                }
                for e, o, eid in zip(new, inline, ids, strict=True)
                if eid > 0
            ]
            for out_row in rows:
                self.recent_novel.append(bool(out_row["cluster"] == NOVEL))
            self.recent_rec.extend(o.rec_error for o, eid in zip(inline, ids, strict=True) if eid > 0)
            self._publish(rows)

    def _predict_inline(self, new: list[NewEvent]) -> list[Output] | None:
        """Outputs for a batch about to be stored, when a model serves and nothing older waits for one."""
        if self.model is None or not new or self.store.last_output_id() != self.store.max_event_id():
            return None
        n_in = self.model.model.cfg.n_in
        if any(e.features.size != n_in for e in new):
            return None  # another channel count: the backlog path gives those their output
        pred = predict(self.model, np.stack([e.features.reshape(-1) for e in new]))
        return [self._output(0, pred, i) for i in range(len(new))]  # IDs come with the commit

    def _output(self, event_id: int, pred: Prediction, i: int) -> Output:
        return Output(
            event_id,
            self.version,
            int(pred.cluster[i]),
            float(pred.probability[i]),
            float(pred.novelty[i]),
            float(pred.rec_error[i]),
            pred.latent[i].tolist(),
        )

    def _ack(self, r: Received, sensor: str | None, seq: int | None, status: str, reason: str = "") -> None:
        if r.identity is None:
            return
        try:
            self.router.send_multipart([r.identity, *encode_ack(sensor, seq, status, reason)], zmq.NOBLOCK)
            counter = self.ack_counters.get(status)
            if counter is None:
                counter = self.ack_counters[status] = self.metrics.acks.labels(status)
            counter.inc()
        except zmq.ZMQError:
            pass  # the peer went away; it resends and is de-duplicated

    def _serve_pending(self, budget_s: float = 0.05) -> None:
        """Outputs for stored events without one, oldest first, until caught up or the time budget is spent."""
        if self.model is None:
            self.metrics.backlog.set(self.store.max_event_id() - self.store.last_output_id())
            return
        deadline = time.monotonic() + budget_s
        n_in = self.model.model.cfg.n_in
        while True:
            ids, x, ok = self.store.pending(512, n_in)
            if len(ids) == 0:
                break
            outputs: list[Output] = []
            pred = predict(self.model, x[ok]) if ok.any() else None
            j = 0
            for i, eid in enumerate(ids):
                if ok[i] and pred is not None:
                    outputs.append(self._output(int(eid), pred, j))
                    self.recent_novel.append(bool(pred.cluster[j] == NOVEL))
                    self.recent_rec.append(float(pred.rec_error[j]))
                    j += 1
                else:  # features of another channel count than the model's: no cluster
                    outputs.append(Output(int(eid), self.version, NOVEL, 0.0, 1e9, 1e9, []))
            try:
                self.store.add_outputs(outputs, mark_published=self.to_mark)
            except sqlite3.OperationalError as e:
                self.metrics.store_errors.labels("outputs").inc()
                self.log.error("store_failed", error=str(e), detail="outputs retried next loop")
                return
            self.to_mark = []
            self._publish(self.store.unpublished(len(outputs) + 512, after_id=self.queued_id))
            if time.monotonic() > deadline:
                break
        self.metrics.backlog.set(self.store.max_event_id() - self.store.last_output_id())

    def _republish(self) -> None:
        """Outputs stored but maybe not published before a crash: publish again (subscribers de-duplicate)."""
        while rows := self.store.unpublished(1024, after_id=self.queued_id):
            self._publish(rows)
        if self.to_mark:
            self.store.mark_published(self.to_mark)
            self.to_mark = []

    def _publish(self, rows: list[dict[str, Any]]) -> None:
        """Queue outputs for subscribers and send what they can take now."""
        per_cluster: dict[int, int] = {}
        for row in rows:
            per_cluster[row["cluster"]] = per_cluster.get(row["cluster"], 0) + 1
            self.outq.append(row)
            self.queued_id = max(self.queued_id, row["event_id"])
        for cluster, n in per_cluster.items():
            self.metrics.per_cluster.labels(str(cluster)).inc(n)
        novel = per_cluster.get(NOVEL, 0)
        if novel:
            self.metrics.novel.inc(novel)
        self._flush()
        over = len(self.outq) - self.cfg.publish.queue_max
        if over > 0:  # a subscriber has been full for long: give up the oldest, say so, never block ingest
            for _ in range(over):
                row = self.outq.popleft()
                self.to_mark.append(row["event_id"])  # dealt with: it stays in the store (wingbeat export)
                self.received_at.pop((row["sensor"], row["seq"]), None)
            self.metrics.publish_dropped.inc(over)
            due = self.dropped_log.due(("publish",), over)
            if due:
                self.log.warning(
                    "publish_dropped",
                    outputs=due,
                    detail=f"a subscriber is more than publish.hwm + publish.queue_max "
                    f"({self.cfg.publish.hwm} + {self.cfg.publish.queue_max}) outputs behind",
                )
        self.metrics.publish_queue.set(len(self.outq))
        if len(self.received_at) > 200_000:  # events from before a restart never come by; do not grow forever
            self.received_at.clear()

    def _flush(self) -> None:
        """Send queued outputs, oldest first, until none is left or a subscriber's queue is full. Only what was
        sent is marked published: after a crash the rest is published again."""
        now = time.monotonic()
        if now < self.publish_from:
            return
        half = len(self.outq) // 2
        sent = 0
        while self.outq:
            row = self.outq[0]
            try:
                self.pub.send_multipart(encode_output(row), zmq.NOBLOCK)
            except zmq.Again:
                break
            self.outq.popleft()
            sent += 1
            if sent == half:
                crash_point("mid_publish")  # some outputs published, none of them marked
            self.to_mark.append(row["event_id"])
            t = self.received_at.pop((row["sensor"], row["seq"]), None)
            if t is not None:
                self.metrics.latency.observe(now - t)
        if sent:
            self.metrics.published.inc(sent)
            self.metrics.publish_queue.set(len(self.outq))

    # ---- training -----------------------------------------------------------------------------------------
    def _trainer_step(self) -> None:
        if self.trainer is not None:
            self._read_trainer()
            return
        if time.monotonic() < self.next_training_at:
            return
        kind = self._training_due()
        if kind:
            self._start_trainer(kind)

    def _training_due(self) -> str:
        t = self.cfg.training
        n = self.n_events
        if (self.state / RETRAIN_REQUEST).exists():
            (self.state / RETRAIN_REQUEST).unlink(missing_ok=True)
            self.retrain = True
        if self.retrain:
            self.retrain = False
            if n >= 16:
                self.log.info("training_requested")
                return "full" if self.model else "first"
            self.log.warning("training_request_ignored", reason=f"only {n} events stored")
        if self.model is None:
            return "first" if n >= t.first_after else ""
        since = n - self.last_training_events
        if since >= t.full_every_events:
            return "full"
        if since >= t.finetune_every_events:
            return "finetune"
        if t.finetune_every_s > 0 and since > 0 and time.monotonic() - self.last_training_time >= t.finetune_every_s:
            return "finetune"
        if len(self.recent_novel) == self.recent_novel.maxlen:
            novel = float(np.mean(self.recent_novel))
            rec = float(np.mean(self.recent_rec))
            ref = float(self.model.manifest.get("gate_metrics", {}).get("train_rec") or np.nan)
            if novel > t.drift_novelty or (np.isfinite(ref) and rec > t.drift_rec_ratio * ref):
                self.log.warning(
                    "drift", novel_fraction=novel, rec_error=rec, training_rec_error=ref, model_version=self.version
                )
                self.recent_novel.clear()
                self.recent_rec.clear()
                return "full"
        return ""

    def _start_trainer(self, kind: str) -> None:
        t = self.cfg.training
        version = self._next_version()
        epochs = {"first": t.epochs_first, "finetune": t.epochs_finetune, "full": t.epochs_full}[kind]
        conf = {
            "epochs": epochs,
            "max_events": t.max_events,
            "device": t.device,
            "threads": t.threads,
            "seed": t.seed,
            "nice": t.nice,
        }
        parent = str(self.models_dir / f"v{self.version}") if self.model else ""
        cmd = [
            sys.executable,
            "-m",
            "daemon.trainer",
            "--state",
            str(self.state),
            "--version",
            str(version),
            "--kind",
            kind,
            "--config",
            json.dumps(conf),
            "--parent",
            parent,
        ]
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(t.threads), "OMP_NUM_THREADS": str(t.threads)}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        run = TrainerRun(proc, kind, version, time.monotonic(), queue.Queue())
        assert proc.stdout is not None and proc.stderr is not None

        def read_stdout(stream: Any, q: queue.Queue[dict[str, Any]]) -> None:
            for line in stream:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    q.put(msg)

        def read_stderr(stream: Any, tail: deque[str]) -> None:
            for line in stream:
                tail.append(line.decode("utf-8", "replace").rstrip())

        run.readers = [
            threading.Thread(target=read_stdout, args=(proc.stdout, run.reports), daemon=True),
            threading.Thread(target=read_stderr, args=(proc.stderr, run.stderr_tail), daemon=True),
        ]
        for reader in run.readers:
            reader.start()
        self.trainer = run
        self.last_training_events = self.n_events
        self.last_training_time = time.monotonic()
        self.metrics.training.set(1)
        self.log.info(
            "training_started",
            kind=kind,
            model_version=version,
            parent=self.version or None,
            epochs=epochs,
            events=self.last_training_events,
            pid=proc.pid,
        )

    def _read_trainer(self) -> None:
        run = self.trainer
        assert run is not None
        code = run.proc.poll()
        if code is not None:
            for t in run.readers:  # the pipes close at exit; the readers finish with what was left in them
                t.join(timeout=5)
        while True:
            try:
                msg = run.reports.get_nowait()
            except queue.Empty:
                break
            if msg.get("type") == "epoch":
                self._training_progress(run, msg)
            elif msg.get("type") == "done":
                run.done = msg
            elif msg.get("type") == "error":
                run.error = str(msg.get("message", ""))
        if code is None:
            return
        done, error = run.done, run.error
        self.trainer = None
        self.metrics.training.set(0)
        seconds = time.monotonic() - run.started
        self.metrics.train_seconds.observe(seconds)
        if code != 0 or done is None:
            why = error or f"trainer exited with {code}" + (f" (signal {-code})" if code < 0 else "") + (
                f": {run.stderr_tail[-1]}" if run.stderr_tail else ""
            )
            self._training_failed(run, why)
            return
        self._consider(run, done, seconds)

    def _training_progress(self, run: TrainerRun, msg: dict[str, Any]) -> None:
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
                beta=msg.get("beta"),
                gamma=msg.get("gamma"),
                rec=msg.get("rec"),
                kl=msg.get("kl"),
            )

    def _training_failed(self, run: TrainerRun, why: str) -> None:
        self.failures += 1
        self.metrics.train_runs.labels(run.kind, "failed").inc()
        self.metrics.train_failures.set(self.failures)
        backoff = min(3600.0, self.cfg.training.backoff_s * 2 ** (self.failures - 1))
        self.next_training_at = time.monotonic() + backoff
        self.log.error(
            "training_failed",
            kind=run.kind,
            model_version=run.version,
            error=why,
            retry_in_s=backoff,
            failures=self.failures,
        )
        self._discard(run.version)
        try:  # the number is used up: versions are never reused, and `status` lists the failure
            self.store.record_model(run.version, "failed", run.kind, {}, why[:500])
        except sqlite3.OperationalError as e:
            self.log.error("store_failed", error=str(e), detail="training failure not recorded")

    def _discard(self, n: int) -> None:
        """Remove what a training for version ``n`` left: the version, or its half-written temporary directory."""
        for p in [self.models_dir / f"v{n}", *self.models_dir.glob(f".v{n}.*")]:
            shutil.rmtree(p, ignore_errors=True)

    def _consider(self, run: TrainerRun, done: dict[str, Any], seconds: float) -> None:
        path = self.models_dir / f"v{run.version}"
        try:
            version = read_version(path)
        except CheckpointError as e:
            self.metrics.models_rejected.labels("unreadable").inc()
            self.store.record_model(run.version, "rejected", run.kind, {}, str(e))
            self._training_failed(run, f"version unreadable: {e}")
            return
        metrics = version.manifest.get("gate_metrics", {})
        why = gate(metrics, self.cfg.training.gate_rec_tolerance, self.cfg.training.gate_ari_tolerance)
        self.failures = 0
        self.metrics.train_failures.set(0)
        if why:
            self.metrics.train_runs.labels(run.kind, "rejected").inc()
            self.metrics.models_rejected.labels("gate").inc()
            self.store.record_model(run.version, "rejected", run.kind, metrics, why)
            self.log.warning(
                "model_rejected", model_version=run.version, kind=run.kind, reason=why, serving=self.version
            )
            return
        self.metrics.train_runs.labels(run.kind, "accepted").inc()
        self.log.info("training_done", model_version=run.version, kind=run.kind, seconds=round(seconds, 1))
        self._swap(version, run.version, run.kind, {})

    def _stop_trainer(self, timeout_s: float = 5.0) -> None:
        run, self.trainer = self.trainer, None
        if run is None:
            return
        run.proc.terminate()
        try:
            run.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait(timeout_s)
        self._discard(run.version)
        self.metrics.training.set(0)
        self.log.info("training_stopped", model_version=run.version, kind=run.kind)

    # ---- housekeeping, reload, shutdown -------------------------------------------------------------------
    def _housekeeping(self) -> None:
        now = time.monotonic()
        # Progress: the loop came round and its last store transaction committed, or failed only because the disk
        # is full (that degrades, DESIGN §7: a restart would free nothing). A loop blocked on the store never gets
        # here; one whose commits fail otherwise (write lock held past the busy timeout, I/O errors) gets here but
        # is not serving: /healthz (the heartbeat) and systemd's watchdog both stop hearing from it.
        if not self.store.write_error or self.store.write_error_name == "SQLITE_FULL":
            self.metrics.loop_heartbeat.set(time.time())
            if now - self.last_watchdog >= self.watchdog_every:
                self.last_watchdog = now
                sd_notify("WATCHDOG=1")
        if self.outq:
            self._flush()
        if now - self.last_housekeeping < 2.0:
            return
        self.last_housekeeping = now
        if self.guard is not None:
            self.guard.drain()
        while self.pub.poll(0):  # subscriptions arrive on the XPUB; read them so they never pile up
            self.pub.recv()
        s = self.cfg.store
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
            self.store.prune_quarantine(self.cfg.ingest.quarantine_keep)
        except sqlite3.OperationalError as e:
            self.metrics.store_errors.labels("retention").inc()
            self.log.error("retention_failed", error=str(e))
        self.metrics.store_bytes.set(self.store.file_bytes())
        self.metrics.raw_bytes.set(self.store.raw_bytes())
        self.metrics.quarantine.set(self.store.quarantine_count())
        sd_notify(f"STATUS={self._status_line()}")
        self._write_status()

    def _next_training(self) -> str:
        t = self.cfg.training
        n = self.n_events
        if self.trainer is not None:
            return "running now"
        if self.model is None:
            return f"first training when {t.first_after} events are stored ({n} now)"
        since = n - self.last_training_events
        parts = [f"fine-tune in {max(0, t.finetune_every_events - since)} events"]
        if t.finetune_every_s > 0:
            left = t.finetune_every_s - (time.monotonic() - self.last_training_time)
            parts.append(f"or {max(0.0, left):.0f} s (with new events)")
        parts.append(f"full retrain in {max(0, t.full_every_events - since)} events, or on drift")
        if time.monotonic() < self.next_training_at:
            parts.append(f"backing off {self.next_training_at - time.monotonic():.0f} s after {self.failures} failures")
        return ", ".join(parts)

    def _write_status(self) -> None:
        """What ``wingbeat status`` shows of the running daemon (the store holds the rest)."""
        run = self.trainer
        info = {
            "pid": os.getpid(),
            "updated_ns": time.time_ns(),
            "events_per_s": round(self.events_per_s(), 1),
            "serving": self.version or None,
            "training": None
            if run is None
            else {"version": run.version, "kind": run.kind, "seconds": round(time.monotonic() - run.started, 1)},
            "next_training": self._next_training(),
            "raw_kept": self.keep_raw,
        }
        try:
            tmp = self.state / ".daemon-status.json.tmp"
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.state / "daemon-status.json")
        except OSError:
            pass  # a full disk must not stop the loop; the metrics say the same

    def events_per_s(self) -> float:
        if len(self.events_window) < 2:
            return 0.0
        span = self.events_window[-1][0] - self.events_window[0][0]
        return sum(n for _, n in list(self.events_window)[1:]) / span if span > 0 else 0.0

    def _status_line(self) -> str:
        model = f"model v{self.version}, {self.model.clusterer.k} clusters" if self.model else "no model yet"
        training = f", training v{self.trainer.version} ({self.trainer.kind})" if self.trainer else ""
        failing = f"store failing ({self.store.write_error}), " if self.store.write_error else ""
        return f"{failing}{self.events_per_s():.0f} events/s, {model}{training}"

    def _reload(self) -> None:
        from daemon.config import ConfigError, load

        self.reload = False
        # MONOTONIC_USEC: systemd ≥ 253 matches it against the reload it asked for (ignored before)
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            new = load(self.config_path, self._overrides) if self.config_path else self.cfg
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), detail="keeping the running configuration")
            sd_notify(f"READY=1\nSTATUS=reload failed, running configuration kept: {e}")
            return
        old_d, new_d = _flatten(self.cfg.to_dict()), _flatten(new.to_dict())
        changed = sorted(k for k in new_d if new_d[k] != old_d.get(k))
        applied = [k for k in changed if k.startswith(RELOADABLE)]
        restart = [k for k in changed if k not in applied]
        kept = {k: old_d[k] for k in restart}
        merged = _unflatten({**new_d, **kept})
        from daemon.config import _build

        self.cfg = _build(Config, merged, "")
        self.log.info("reloaded", applied=applied, needs_restart=restart)
        if self.guard is not None:
            try:
                self.log.info("client_keys_reloaded", allowed=self.guard.reload_clients())
            except ValueError as e:
                self.log.error("client_keys_reload_failed", error=str(e), detail="keeping the keys loaded before")
        sd_notify(f"READY=1\nSTATUS={self._status_line()}")

    def _shutdown(self) -> None:
        sd_notify("STOPPING=1\nSTATUS=stopping: draining the batch in flight, stopping the trainer")
        self.log.info("stopping", detail="draining")
        try:
            for s in (self.router, self.pull):
                if s is not None:
                    s.close(linger=0)  # stop taking input; unacked events are resent by their senders
            if self.model is not None:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and self.store.max_event_id() > self.store.last_output_id():
                    self._serve_pending(budget_s=1.0)
            self._stop_trainer()
            if self.featuriser is not None:
                self.featuriser.shutdown(wait=True)
            self._flush()  # what subscribers can take now; the rest is published again at the next start
            if self.to_mark:
                self.store.mark_published(self.to_mark)
        finally:
            if self.metrics_server:
                self.metrics_server.stop()
            self.pub.close(linger=2000)
            if self.guard is not None:
                self.guard.stop()
            self.ctx.term()
            self.store.close()
            self.log.info("stopped")


def _loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this host only (ipc/inproc, or tcp on a loopback address)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        node = out
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
