"""Prometheus metrics of the daemon (DESIGN §7) and the HTTP endpoint serving ``/metrics`` and ``/healthz``."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from daemon.protocol import REASONS

disable_created_metrics()  # no *_created series: they double the exposition and no panel uses them

# up to minutes: events stored before a first model (or during a long backlog) wait that long for their output
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self, max_sensors: int = 64) -> None:
        self.registry = r = CollectorRegistry()
        self.max_sensors = max_sensors
        self._sensors: set[str] = set()
        try:
            ver = version("wingbeat")
        except PackageNotFoundError:
            ver = "unknown"
        Info("wingbeat_build", "Wingbeat build information.", registry=r).info({"version": ver})
        self.received = Counter("wingbeat_events_received_total", "Ingest messages received.", ["endpoint"], registry=r)
        self.stored = Counter("wingbeat_events_stored_total", "Events committed to the store.", ["sensor"], registry=r)
        self.rejected = Counter(
            "wingbeat_events_rejected_total", "Ingest messages refused, by reason.", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "wingbeat_events_duplicate_total", "Events received again (already stored).", registry=r
        )
        self.gaps = Counter(
            "wingbeat_sequence_gaps_total", "Sequence numbers skipped by senders.", ["sensor"], registry=r
        )
        self.refused = Counter(
            "wingbeat_connections_refused_total",
            "Connections refused at the CURVE handshake (key not allowed, plaintext client), by socket and reason.",
            ["socket", "reason"],
            registry=r,
        )
        self.acks = Counter("wingbeat_acks_sent_total", "Acknowledgements sent, by status.", ["status"], registry=r)
        self.acks_undelivered = Counter(
            "wingbeat_acks_undelivered_total",
            "Acknowledgements ROUTER could not deliver (the sender is gone, or its queue is full); it resends.",
            ["reason"],
            registry=r,
        )
        self.plain_dropped = Counter(
            "wingbeat_plain_dropped_total",
            "Events received on the plain (PULL) endpoint and lost to a failed commit: nobody resends them.",
            registry=r,
        )
        self.subscriptions = Gauge(
            "wingbeat_subscriptions", "Live subscriptions on the publish socket (heartbeats cut hung ones).", registry=r
        )
        self.published = Counter("wingbeat_outputs_published_total", "Outputs published.", registry=r)
        self.publish_dropped = Counter(
            "wingbeat_publish_dropped_total",
            "Outputs never published: the publish queue was full because a subscriber fell behind.",
            registry=r,
        )
        self.publish_queue = Gauge(
            "wingbeat_publish_queue_outputs", "Outputs waiting in the daemon for a slow subscriber.", registry=r
        )
        self.novel = Counter("wingbeat_events_novel_total", "Events assigned no cluster (novel).", registry=r)
        self.per_cluster = Counter(
            "wingbeat_cluster_events_total", "Events assigned to each cluster.", ["cluster"], registry=r
        )
        self.latency = Histogram(
            "wingbeat_receive_to_publish_seconds",
            "Time from receiving an event to publishing its output.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ack_latency = Histogram(
            "wingbeat_receive_to_ack_seconds",
            "Time from receiving an event to acknowledging it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "wingbeat_batch_events",
            "Events per micro-batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.backlog = Gauge("wingbeat_backlog_events", "Stored events waiting for an output.", registry=r)
        self.store_bytes = Gauge(
            "wingbeat_store_bytes", "Bytes of the store's database file and its write-ahead log.", registry=r
        )
        self.raw_bytes = Gauge("wingbeat_store_raw_bytes", "Bytes of raw samples kept.", registry=r)
        self.disk_free = Gauge(
            "wingbeat_disk_free_bytes", "Free bytes on the state directory's filesystem.", registry=r
        )
        self.disk_size = Gauge("wingbeat_disk_size_bytes", "Size of the state directory's filesystem.", registry=r)
        # the store's limits from the config, so alerts compare against them instead of a copied number
        self.raw_limit = Gauge(
            "wingbeat_store_raw_limit_bytes", "store.raw_max_bytes: raw samples are pruned above this.", registry=r
        )
        self.min_free = Gauge(
            "wingbeat_store_min_free_bytes",
            "store.min_free_bytes: with less free space on the disk, raw samples are not kept.",
            registry=r,
        )
        self.raw_paused = Gauge(
            "wingbeat_raw_paused", "1 while raw samples are not kept (disk low or full).", registry=r
        )
        self.store_errors = Counter("wingbeat_store_errors_total", "Failed store transactions.", ["op"], registry=r)
        self.quarantine = Gauge("wingbeat_quarantine_rows", "Rejected messages kept in quarantine.", registry=r)
        self.model_version = Gauge("wingbeat_model_version", "Serving model version (0 = none).", registry=r)
        self.model_age = Gauge(
            "wingbeat_model_updated_timestamp_seconds", "When the serving model was swapped in.", registry=r
        )
        self.clusters = Gauge("wingbeat_model_clusters", "Clusters of the serving model.", registry=r)
        self.beta = Gauge("wingbeat_model_beta", "β of the serving model at the end of its training.", registry=r)
        self.models_rejected = Counter(
            "wingbeat_models_rejected_total", "Model versions refused (gate or unreadable).", ["reason"], registry=r
        )
        self.train_runs = Counter(
            "wingbeat_training_runs_total", "Training runs by kind and outcome.", ["kind", "outcome"], registry=r
        )
        self.train_seconds = Histogram(
            "wingbeat_training_duration_seconds",
            "Wall time of training runs.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
            registry=r,
        )
        self.training = Gauge("wingbeat_training_active", "1 while a training runs.", registry=r)
        self.train_epoch = Gauge("wingbeat_training_epoch", "Epoch of the running training.", registry=r)
        self.train_beta = Gauge("wingbeat_training_beta", "β of the running training.", registry=r)
        self.train_gamma = Gauge("wingbeat_training_gamma", "γ of the running training.", registry=r)
        self.train_loss = Gauge(
            "wingbeat_training_loss", "Losses of the running training's last epoch.", ["term"], registry=r
        )
        self.train_failures = Gauge(
            "wingbeat_training_consecutive_failures", "Training runs failed in a row.", registry=r
        )
        self.last_event = Gauge(
            "wingbeat_sensor_last_event_timestamp_seconds",
            "When a sensor's last event was stored.",
            ["sensor"],
            registry=r,
        )
        self.loop_heartbeat = Gauge(
            "wingbeat_loop_heartbeat_timestamp_seconds", "Last time the serving loop ran.", registry=r
        )
        # the network (daemon.net.link, DESIGN §9): 0 on a daemon without [network]
        self.outbox_events = Gauge(
            "wingbeat_outbox_events", "Station: stored events not yet acked by JetStream (the outbox).", registry=r
        )
        self.outbox_age = Gauge(
            "wingbeat_outbox_age_seconds",
            "Station: seconds since the oldest event of the outbox was stored (0 when it is empty).",
            registry=r,
        )
        self.net_connected = Gauge("wingbeat_network_connected", "1 while connected to NATS.", registry=r)
        self.net_forwarded = Counter(
            "wingbeat_network_forwarded_total", "Station: events acked by JetStream (resends included).", registry=r
        )
        self.net_pooled = Counter(
            "wingbeat_network_pooled_total", "Centre: stations' events stored in the pooled store.", registry=r
        )
        self.net_quarantined = Counter(
            "wingbeat_network_quarantined_total",
            "Centre: malformed messages from the stream, quarantined, by reason.",
            ["reason"],
            registry=r,
        )
        self.net_versions_refused = Counter(
            "wingbeat_network_versions_refused_total",
            "Station: model versions in the bucket refused (size, digest, unpack), each once and never fetched again.",
            ["reason"],
            registry=r,
        )
        self.net_outputs = Counter(
            "wingbeat_network_outputs_total",
            "Station: outputs for NATS subjects wingbeat.out.<station>.<cluster>, published or dropped.",
            ["outcome"],
            registry=r,
        )
        # live diversity over rolling windows of arrival time (daemon.serve.live_diversity, docs/diversity.md)
        self.diversity = Gauge(
            "wingbeat_diversity",
            "Observed Hill number of order q (0 richness, 1 exp Shannon, 2 inverse Simpson) of the served clusters' "
            "abundances in the rolling window; novel events excluded.",
            ["q", "window"],
            registry=r,
        )
        self.diversity_estimated = Gauge(
            "wingbeat_diversity_estimated",
            "Estimated (asymptotic: Chao1, Chao et al. 2013, unbiased inverse Simpson) Hill number of order q in the "
            "rolling window.",
            ["q", "window"],
            registry=r,
        )
        self.coverage = Gauge(
            "wingbeat_sample_coverage",
            "Estimated sample coverage (Chao & Jost 2012) of the rolling window; NaN while it holds no event.",
            ["window"],
            registry=r,
        )
        self.abundance = Gauge(
            "wingbeat_cluster_abundance",
            "Events of each of the serving version's clusters in the rolling window.",
            ["cluster", "window"],
            registry=r,
        )
        self.window_novel = Gauge(
            "wingbeat_diversity_novel_events",
            "Novel events (no cluster) in the rolling window.",
            ["window"],
            registry=r,
        )
        self.new_clusters = Counter(
            "wingbeat_model_new_clusters_total",
            "Clusters a newly serving version has that no version served before it in this process.",
            registry=r,
        )
        self.up_since = Gauge("wingbeat_start_time_seconds", "When the daemon started.", registry=r)
        self.up_since.set(time.time())
        # Known label values exist from the start at 0: rate() and increase() then see the first increment, and an
        # alert has a series to compare before anything went wrong.
        for reason in REASONS:
            if reason != "duplicate":  # duplicates are acked as such and counted apart, never rejected
                self.rejected.labels(reason)
        for endpoint in ("ack", "plain"):
            self.received.labels(endpoint)
        for status in ("stored", "duplicate", "rejected"):
            self.acks.labels(status)
        for reason in ("peer_gone", "queue_full", "error"):
            self.acks_undelivered.labels(reason)
        for kind in ("first", "finetune", "full"):
            for outcome in ("accepted", "rejected", "failed"):
                self.train_runs.labels(kind, outcome)
        for why in ("gate", "unreadable"):
            self.models_rejected.labels(why)
        for op in ("ingest", "outputs", "retention"):
            self.store_errors.labels(op)
        # daemon.net.wire.REASONS
        for why in ("frame", "json", "header", "features", "raw", "subject", "encoding", "nesting", "store", "decode"):
            self.net_quarantined.labels(why)
        for why in ("size", "digest", "unpack"):  # daemon.net.versions.REFUSALS
            self.net_versions_refused.labels(why)
        for outcome in ("published", "dropped"):
            self.net_outputs.labels(outcome)

    def sensor(self, name: str) -> str:
        """The label for a sensor: itself for the first ``max_sensors`` seen, "other" after that."""
        if name in self._sensors:
            return name
        if len(self._sensors) < self.max_sensors:
            self._sensors.add(name)
            self.gaps.labels(name)  # at 0 from the sensor's first event: increase() then counts its first gap
            return name
        self.gaps.labels("other")
        return "other"


class MetricsServer:
    """``/metrics`` (Prometheus text) and ``/healthz`` (200 while the serving loop made progress recently)."""

    def __init__(self, metrics: Metrics, host: str, port: int, stale_after_s: float = 10.0) -> None:
        registry = metrics.registry
        heartbeat = metrics.loop_heartbeat

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/metrics":
                    body, status, ctype = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                elif path == "/healthz":
                    age = time.time() - heartbeat._value.get()
                    ok = age < stale_after_s
                    body = f"{'ok' if ok else 'stalled'}: loop ran {age:.1f} s ago\n".encode()
                    status, ctype = (200 if ok else 503), "text/plain; charset=utf-8"
                else:
                    body, status, ctype = b"not found: try /metrics or /healthz\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)

    @classmethod
    def listening(cls, metrics: Metrics, listen: str) -> MetricsServer | None:
        """Started on ``listen`` ("host:port", "[v6]:port"; port 0: one the OS chooses); None for ""."""
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        server = cls(metrics, host.strip("[]"), int(port))
        server.start()
        return server

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
