"""``wingbeat run``: the serving loop (DESIGN §1, §2, §5–§7). It wires the stages and runs them in order:

    receive (ingest) → pipeline (decode, featurise, predict) → store (one transaction) → ack → publish
      → supervise (trainer, gate, swap) → exchange (network, with [network]) → housekeep

Each stage owns its sockets, queues and state (``daemon.serve.ingest``, ``daemon.serve.pipeline``,
``daemon.serve.publish``, ``daemon.train.supervisor``, ``daemon.serve.housekeeping``); state passes between them as
arguments. While batch N is stored, acked and published here, batch N+1 is featurised in the featurise threads.
Signals only set flags.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any

import zmq

from daemon.net.link import NetworkLink
from daemon.ops import logs
from daemon.ops.config import Config, ConfigError, reload
from daemon.ops.faults import crash_point
from daemon.ops.metrics import Metrics, MetricsServer
from daemon.ops.security import SocketSecurity
from daemon.ops.systemd import Watchdog, reloading, sd_notify, watchdog_interval
from daemon.protocol import Output
from daemon.serve.housekeeping import Housekeeper, Rate
from daemon.serve.ingest import Ingest, decode_batch
from daemon.serve.live_diversity import LiveDiversity
from daemon.serve.pipeline import Featuriser, Job, outputs_for, process, settle
from daemon.serve.publish import Publisher
from daemon.serve.relabel import Relabeller
from daemon.store.db import Store
from daemon.store.versions import ModelDir, Refused
from daemon.train.supervisor import Supervisor
from model.checkpoint import ModelVersion
from model.cluster import NOVEL
from model.spectra import FeatureConfig

SERVABLE_INPUTS = ("recordings", "spectra")  # "features" models were trained on inputs made another way


class Service:
    def __init__(self, cfg: Config, config_path: Path | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.cfg, self.config_path, self.overrides = cfg, config_path, overrides or {}  # flags win on reload too
        self.log = logs.get()
        self.state = Path(cfg.state_dir)
        self.store = Store(self.state, checkpoint_every_s=0.1)
        if self.store.migrated:
            old, backup = self.store.migrated
            self.log.warning(
                "store_migrated", from_schema=old, to_schema=self.store.schema_version(), backup=str(backup)
            )
        self.metrics = Metrics(cfg.metrics.max_sensors)
        self.models = ModelDir(self.state / "models", self.store)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.ingest = Ingest(self.ctx, cfg.ingest, self.metrics, self.store.last_seqs())
        live = LiveDiversity(cfg.diversity, self.metrics, cfg.network.station)  # gauges and window summaries
        self.publisher = Publisher(self.ctx, cfg.publish, self.metrics, live)
        self.featuriser = Featuriser(cfg.ingest.featurise_threads)
        self.housekeeper = Housekeeper(self.state, self.store, self.metrics)
        self.supervisor = Supervisor(self.state, cfg, self.store, self.models, self.metrics)
        self.schedule = self.supervisor.schedule
        self.network = NetworkLink(cfg.network, self.state, self.store, self.metrics) if cfg.network.nats else None
        self.relabeller = Relabeller(self.state, self.store)  # re-labels history for each new version, when idle
        stored = self.store.feature_config()
        self.features = FeatureConfig(**stored) if stored else FeatureConfig()
        self.model: ModelVersion | None = None
        self.version = 0
        self.n_events = self.store.count_events()  # kept up to date here: count(*) scans the table
        self.jobs: deque[Job] = deque()  # received batches not yet committed, oldest first
        self.rate = Rate()
        self.stop = self.reload = False
        self.watchdog = Watchdog(watchdog_interval(os.environ, os.getpid()))
        self.last_housekeeping = 0.0
        self.security: SocketSecurity | None = None  # at bind
        self.metrics_server: MetricsServer | None = None

    # ---- start-up -----------------------------------------------------------------------------------------
    def bind(self) -> None:
        c = self.cfg
        self.security = SocketSecurity(self.ctx, c.security, self.metrics)
        self.ingest.bind(self.security.secure)
        self.publisher.bind(self.security.secure)
        self.metrics_server = MetricsServer.listening(self.metrics, c.metrics.listen)
        metrics = f"{c.metrics.listen.rpartition(':')[0]}:{self.metrics_server.port}" if self.metrics_server else ""
        info = {"pid": os.getpid(), **self.ingest.endpoints(), "publish": self.publisher.endpoint(), "metrics": metrics}
        self.log.info("listening", state=str(self.state), **info)
        self.housekeeper.write_endpoints(info)

    def load_initial_model(self) -> None:
        """``--model`` if given (imported as the next version), else the newest version in the state that loads."""
        try:
            got = self.models.at_start(self.cfg.model, self._unservable, self.metrics)
        except Refused as e:  # a bad --model is a start-up error, said in one line
            raise ConfigError(f"model: {self.cfg.model}: {e}") from None
        if got is not None:
            self._swap(*got)
        if self.store.feature_config() is None:  # what the stored features are, from the first event on
            self.store.set_feature_config(self.features.__dict__)
        if self.model is None:
            self.log.info(
                "no_model",
                detail="events are stored; outputs start when a first model is trained",
                first_training_after=self.cfg.training.first_after,
            )

    def _unservable(self, version: ModelVersion) -> str:
        """Why a version cannot serve this store ("" = it can): its inputs must be made as the stored ones are."""
        if version.input_kind not in SERVABLE_INPUTS:
            return f"trained on {version.input_kind!r} inputs; the daemon featurises recordings"
        if version.features != self.features and (self.n_events or self.store.feature_config() is not None):
            return (
                f"its features ({version.features}) differ from the stored events' ({self.features}); "
                "serve it from a new state directory"
            )
        self.features = version.features  # an empty store takes the version's features
        return ""

    def _swap(self, version: ModelVersion, n: int, why: str, extra: dict[str, Any]) -> None:
        self.model, self.version = version, n
        crash_point("swap")  # the new version is on disk and in memory, not yet recorded as serving
        gm = version.manifest.get("gate_metrics", {})
        self.store.record_model(n, "serving", version.manifest.get("kind", why), {**gm, **extra})
        self.metrics.model_version.set(n)
        self.metrics.model_age.set(time.time())
        self.metrics.clusters.set(version.clusterer.k)
        self.metrics.beta.set(float(version.manifest.get("beta_schedule", {}).get("beta", 0.0)))
        self.publisher.live_clusters(version.clusterer.ids.tolist())
        self.relabeller.serving(n)
        self.schedule.serving(float(gm.get("train_rec") or "nan"))
        ids = version.clusterer.ids.tolist()
        gm_log = {k: v for k, v in gm.items() if k != "device"}
        self.log.info(
            "model_serving", model_version=n, how=why, clusters=version.clusterer.k, cluster_ids=ids, **gm_log
        )

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> int:
        for sig, flag in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload")):
            signal.signal(sig, lambda *_, f=flag: setattr(self, f, True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self.schedule, "requested", True))
        self.bind()
        self.load_initial_model()
        self.schedule.last_events = self.n_events if self.model else 0
        if self.network is not None:
            self.network.start(self.version, self.store.feature_config())
            if self.version:  # the centre (re)puts its serving version; a station ignores this
                self.network.offer_version(self.version, self.models.path(self.version))
        while rows := self.store.unpublished(1024, after_id=self.publisher.queued_id):  # maybe lost in a crash
            self.publisher.publish(rows)
        sd_notify("READY=1\nSTATUS=" + self.status_line())  # sockets bound, model (if any) loaded
        self.log.info(
            "ready",
            model_version=self.version or None,
            events=self.n_events,
            watchdog_s=self.watchdog.every_s if os.environ.get("NOTIFY_SOCKET") else None,
        )
        try:
            while not self.stop:
                # One receive and one commit per turn, so batches keep their size. With a batch in flight, take
                # only what is queued now; with nothing more queued, commit at once.
                got = self.ingest.receive(0, linger=False) if self.jobs else self.ingest.receive(100)
                if got:
                    self.jobs.append(
                        self.featuriser.start(
                            decode_batch(got, self.ingest.limits), self.features, busy=bool(self.jobs)
                        )
                    )
                if self.jobs and (len(self.jobs) > 1 or not got or not self.ingest.waiting()):
                    self.commit(self.jobs.popleft())
                self.serve_backlog()
                self.supervise()
                self.exchange()
                self.housekeep()
                if self.reload:
                    self.apply_reload()
            while self.jobs:  # received before the stop: commit and ack them
                self.commit(self.jobs.popleft())
        finally:
            self.shutdown()
        return 0

    def commit(self, job: Job) -> None:
        """Store a featurised batch in one transaction, then ack it and publish its outputs."""
        # outputs go with the batch only when a model serves and nothing older waits for one (two queries: only then)
        caught_up = self.model is not None and self.store.last_output_id() == self.store.max_event_id()
        p = process(
            job.decoded, job.featurised(), self.model, self.version, caught_up, self.cfg.ingest.quarantine_frame_bytes
        )
        marks = self.publisher.take_published() if p.outputs is not None else []
        crash_point("before_commit")
        events = [e for _, e in p.events]
        try:
            ids = self.housekeeper.ingest(events, p.features, p.quarantine, p.outputs, marks)
        except sqlite3.OperationalError as err:
            self.publisher.untake(marks)
            plain = sum(r.endpoint == "plain" for r in job.decoded.received)
            self.metrics.plain_dropped.inc(plain)  # nobody resends these: counted, never silent
            self.log.error(
                "store_failed",
                error=str(err),
                events=len(events),
                plain_dropped=plain,
                detail="not acked; senders on the acked endpoint resend",
            )
            time.sleep(0.2)
            return
        crash_point("after_commit")  # committed, nothing acked or published yet
        s = settle(p, ids)
        self.ingest.committed(s, p.rejects + s.refused, len(job.decoded.received))
        self.n_events += len(s.stored)
        self.rate.add(time.monotonic(), len(s.stored))
        for r, _, eid in s.stored:
            self.publisher.arrived(eid, r.t)
        if s.outputs:  # stored with the events: publish now, no second commit, no read-back
            self._served(s.outputs)

    def _served(self, outputs: list[Output]) -> None:
        self.schedule.observe(self.n_events, [o.cluster == NOVEL for o in outputs], [o.rec_error for o in outputs])
        self.publisher.publish(outputs)
        if self.network is not None:
            self.network.publish(outputs)

    def serve_backlog(self, budget_s: float = 0.05) -> None:
        """Outputs for stored events without one, oldest first, until caught up or the time budget is spent."""
        deadline = time.monotonic() + budget_s
        while self.model is not None:
            pending = self.store.pending(512, self.model.model.cfg.n_in)
            if not pending.events:
                break
            outputs = outputs_for(self.model, self.version, pending.events, pending.x, pending.ok)
            marks = self.publisher.take_published()
            try:
                self.store.add_outputs(outputs, mark_published=marks)
            except sqlite3.OperationalError as e:
                self.publisher.untake(marks)
                self.metrics.store_errors.labels("outputs").inc()
                self.log.error("store_failed", error=str(e), detail="outputs retried next loop")
                return
            self._served([o for o, ok in zip(outputs, pending.ok.tolist(), strict=True) if ok])
            self.publisher.publish(self.store.unpublished(len(outputs) + 512, after_id=self.publisher.queued_id))
            if time.monotonic() > deadline:
                break
        self.metrics.backlog.set(self.store.max_event_id() - self.store.last_output_id())

    def supervise(self) -> None:
        self.schedule.observe(self.n_events)
        if self.network is not None and not self.network.trains:
            return  # a station takes its versions from the network (exchange)
        accepted = self.supervisor.step(time.monotonic(), self.version, self._unservable)
        if accepted is not None:
            version, n, kind = accepted
            self._swap(version, n, kind, {})
            if self.network is not None:
                self.network.offer_version(n, self.models.path(n))

    def exchange(self) -> None:
        """The network stage (``daemon.net.link``): record the outbox watermark JetStream acked; at the centre,
        store the stations' events; at a station, swap in a newer version from the network."""
        net = self.network
        if net is None:
            return
        if stored := net.commit(self.store):
            self.n_events += stored
            self.rate.add(time.monotonic(), stored)
        if (got := net.take_version()) is None:
            return
        n, path = got
        adopted = self.models.from_network(n, path, self._unservable, self.metrics)
        if adopted is None:
            net.refused(n)
        else:
            self._swap(*adopted, "network", {"network_version": n})
            net.served(n)

    # ---- housekeeping, reload, shutdown -------------------------------------------------------------------
    def housekeep(self) -> None:
        now = time.monotonic()
        # Progress: the loop came round and its last store transaction committed, or failed only because the disk
        # is full (that degrades, DESIGN §7: a restart would free nothing). A loop blocked on the store never gets
        # here; one whose commits fail otherwise (write lock held past the busy timeout, I/O errors) gets here but
        # is not serving: /healthz (the heartbeat) and systemd's watchdog both stop hearing from it.
        if not self.store.write_error or self.store.write_error_name == "SQLITE_FULL":
            self.metrics.loop_heartbeat.set(time.time())
            self.watchdog.progress(now)
        if self.publisher.queue:
            self.publisher.flush()
        self.housekeeper.prune_turn()
        if now - self.last_housekeeping < 2.0:
            return
        self.last_housekeeping = now
        if self.security is not None:
            self.security.drain()
        self.publisher.read_subscriptions()
        for summary in self.publisher.close_windows(time.time()):
            if self.network is not None:
                self.network.diversity(summary)
        self.housekeeper.run(self.cfg)
        sd_notify(f"STATUS={self.status_line()}")
        run = self.supervisor.run
        training = None if run is None else {"version": run.version, "kind": run.kind, "seconds": now - run.started}
        self.housekeeper.write_status(self.rate.per_s(), self.version, training, self.schedule.explain(now))

    def status_line(self) -> str:
        model = f"model v{self.version}, {self.model.clusterer.k} clusters" if self.model else "no model yet"
        run = self.supervisor.run
        training = f", training v{run.version} ({run.kind})" if run else ""
        failing = f"store failing ({self.store.write_error}), " if self.store.write_error else ""
        return f"{failing}{self.rate.per_s():.0f} events/s, {model}{training}"

    def apply_reload(self) -> None:
        self.reload = False
        reloading()
        try:
            new, applied, restart = reload(self.cfg, self.config_path, self.overrides)
        except ConfigError as e:
            self.log.error("reload_failed", error=str(e), detail="keeping the running configuration")
            sd_notify(f"READY=1\nSTATUS=reload failed, running configuration kept: {e}")
            return
        self.cfg = new
        self.ingest.cfg = new.ingest  # batch_max, batch_wait_ms (the rest of [ingest] needs a restart)
        self.supervisor.reconfigure(new)
        self.log.info("reloaded", applied=applied, needs_restart=restart)
        if self.security is not None:
            self.security.reload()
        sd_notify(f"READY=1\nSTATUS={self.status_line()}")

    def shutdown(self) -> None:
        sd_notify("STOPPING=1\nSTATUS=stopping: draining the batch in flight, stopping the trainer")
        self.log.info("stopping", detail="draining")
        try:
            self.ingest.close()
            deadline = time.monotonic() + 10
            while (
                self.model and time.monotonic() < deadline and self.store.max_event_id() > self.store.last_output_id()
            ):
                self.serve_backlog(budget_s=1.0)
            self.supervisor.stop()
            self.relabeller.stop()
            if self.network is not None:
                self.network.stop(self.store)  # outputs queued for NATS go out; the watermark is recorded
            self.featuriser.close()
            self.publisher.flush()  # what subscribers can take now; the rest is published again at the next start
            self.store.mark_published(self.publisher.take_published())
        finally:
            if self.metrics_server:
                self.metrics_server.stop()
            self.publisher.close()
            if self.security is not None:
                self.security.stop()
            self.ctx.term()
            self.store.close()
            self.log.info("stopped")
