"""Publishing: the XPUB, the bounded queue of outputs waiting for subscribers, and which outputs count as
published.

The XPUB never drops silently (``XPUB_NODROP``): a send fails while any subscriber's queue is full and the
output waits here, up to ``publish.queue_max``; beyond that the oldest are given up and counted. Heartbeats cut
subscribers that stopped answering. What was sent (or given up) is handed to the next store transaction with
``take_published``, which marks it: after a crash, what was not marked is published again (subscribers
de-duplicate by ``event_id``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

import zmq

from daemon.ops import logs
from daemon.ops.config import Publish as PublishConfig
from daemon.ops.faults import crash_point
from daemon.ops.metrics import Metrics
from daemon.protocol import Output, encode_output
from daemon.serve.ingest import Secure
from daemon.serve.live_diversity import LiveDiversity
from model.cluster import NOVEL


class Publisher:
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        cfg: PublishConfig,
        metrics: Metrics,
        live: LiveDiversity | None = None,
    ) -> None:
        self.ctx, self.cfg, self.metrics, self.live = ctx, cfg, metrics, live
        self.notices: deque[list[bytes]] = deque(maxlen=64)  # diversity summaries a full subscriber could not take
        self.log = logs.get()
        self.queue: deque[Output] = deque()  # oldest first
        self.queued_id = 0  # the newest event ID ever queued: a republish starts after it
        self.published: list[int] = []  # sent or given up, not yet marked in the store
        self.received_at: dict[int, float] = {}  # event ID → monotonic receive time, for the latency histogram
        self.subscriptions = 0
        self.start_at = 0.0  # monotonic time from which outputs go out
        self.dropped_log = logs.RateLimited(10.0)
        self.sock: zmq.Socket[bytes] | None = None
        self.clusters: set[str] = set()  # cluster labels of wingbeat_outputs_by_cluster_total: live ones only

    def bind(self, secure: Secure) -> None:
        c = self.cfg
        self.sock = s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.SNDHWM, c.hwm)
        s.setsockopt(zmq.XPUB_NODROP, 1)
        s.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, so that the subscription count is exact
        if c.sndbuf_bytes:
            s.setsockopt(zmq.SNDBUF, c.sndbuf_bytes)
        s.setsockopt(zmq.LINGER, 2000)
        if c.heartbeat_s > 0:
            s.setsockopt(zmq.HEARTBEAT_IVL, int(c.heartbeat_s * 1000))
            s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(3 * c.heartbeat_s * 1000))
        secure(s, "publish", c.endpoint)
        s.bind(c.endpoint)
        # subscribers of the process before a restart reconnect within ZeroMQ's reconnect interval (0.1 s by
        # default): publishing at once would give them nothing of what is republished first
        self.start_at = time.monotonic() + c.start_grace_s

    def endpoint(self) -> str:
        assert self.sock is not None
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def arrived(self, event_id: int, t: float) -> None:
        """When an event was received: its output's latency is observed when it is sent."""
        self.received_at[event_id] = t
        if len(self.received_at) > 200_000:  # events from before a restart never come by; do not grow forever
            self.received_at.clear()

    def live_clusters(self, ids: list[int]) -> None:
        """The serving version's clusters: their labels exist from now (at 0: rate() counts the first output),
        labels of clusters no version serves any more are removed, so labels stay bounded across versions."""
        live = {str(c) for c in [NOVEL, *ids]}
        for gone in self.clusters - live:
            self.metrics.per_cluster.remove(gone)
        for c in live:
            self.metrics.per_cluster.labels(c)
        self.clusters = live
        if self.live is not None:
            self.live.serving(ids)

    def publish(self, outputs: list[Output]) -> None:
        """Queue outputs for subscribers and send what they can take now."""
        per_cluster: dict[int, int] = {}
        for o in outputs:
            per_cluster[o.cluster] = per_cluster.get(o.cluster, 0) + 1
            self.queue.append(o)
            self.queued_id = max(self.queued_id, o.event_id)
        for cluster, n in per_cluster.items():
            label = str(cluster)
            if label in self.clusters:  # an output of an older version's cluster is sent, not labelled
                self.metrics.per_cluster.labels(label).inc(n)
        if per_cluster.get(NOVEL):
            self.metrics.novel.inc(per_cluster[NOVEL])
        if self.live is not None and outputs:
            self.live.add(per_cluster, {o.model_version for o in outputs}, time.time())
        self.flush()
        over = len(self.queue) - self.cfg.queue_max
        if over > 0:  # a subscriber has been full for long: give up the oldest, say so, never block ingest
            for _ in range(over):
                o = self.queue.popleft()
                self.published.append(o.event_id)  # dealt with: it stays in the store (wingbeat export)
                self.received_at.pop(o.event_id, None)
            self.metrics.publish_dropped.inc(over)
            due = self.dropped_log.due(("publish",), over)
            if due:
                self.log.warning(
                    "publish_dropped",
                    outputs=due,
                    detail=f"a subscriber is more than publish.hwm + publish.queue_max "
                    f"({self.cfg.hwm} + {self.cfg.queue_max}) outputs behind",
                )
        self.metrics.publish_queue.set(len(self.queue))

    def flush(self) -> None:
        """Send queued outputs, oldest first, until none is left or a subscriber's queue is full."""
        if self.notices:
            self.send_notices()
        now = time.monotonic()
        if now < self.start_at or self.sock is None:
            return
        half = len(self.queue) // 2
        sent = 0
        while self.queue:
            o = self.queue[0]
            try:
                self.sock.send_multipart(encode_output(o), zmq.NOBLOCK)
            except zmq.Again:
                break
            self.queue.popleft()
            sent += 1
            if sent == half:
                crash_point("mid_publish")  # some outputs published, none of them marked
            self.published.append(o.event_id)
            t = self.received_at.pop(o.event_id, None)
            if t is not None:
                self.metrics.latency.observe(now - t)
        if sent:
            self.metrics.published.inc(sent)
            self.metrics.publish_queue.set(len(self.queue))

    def close_windows(self, now: float) -> list[dict[str, Any]]:
        """Housekeeping: the live diversity gauges set, and the summaries of the windows closed by ``now`` (s since
        the epoch) sent on topic ``diversity.<station or "local">``; returns those summaries."""
        if self.live is None:
            return []
        closed = self.live.refresh(now)
        for body in closed:
            self.notices.append([self.live.topic.encode(), json.dumps(body).encode()])
        self.send_notices()
        return closed

    def send_notices(self) -> None:
        """Summaries go out as subscribers can take them; the oldest are given up beyond 64 waiting."""
        if self.sock is None or time.monotonic() < self.start_at:
            return
        while self.notices:
            try:
                self.sock.send_multipart(self.notices[0], zmq.NOBLOCK)
            except zmq.Again:
                return
            self.notices.popleft()

    def take_published(self) -> list[int]:
        """Event IDs published (or given up) since the last call: the next store transaction marks them. If that
        transaction fails, hand them back with ``untake``."""
        taken, self.published = self.published, []
        return taken

    def untake(self, ids: list[int]) -> None:
        self.published = ids + self.published

    def read_subscriptions(self) -> None:
        """Subscriptions arrive on the XPUB (``\\x01topic``, ``\\x00topic`` when a subscriber leaves or is cut off
        by the heartbeat): read them so they never pile up, and count the live ones."""
        assert self.sock is not None
        while self.sock.poll(0):
            msg = self.sock.recv()
            if msg[:1] == b"\x01":
                self.subscriptions += 1
            elif msg[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
        self.metrics.subscriptions.set(self.subscriptions)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=2000)
