"""Ingest: the ROUTER (acked) and PULL (plain) sockets, receiving micro-batches, decoding them, and acks.

``decode_batch`` is pure: frames in, events, named rejections and in-batch duplicates out. ``Ingest`` owns the
sockets; it never decides what is stored, only receives and answers.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from daemon.ops import logs
from daemon.ops.config import Ingest as IngestConfig
from daemon.ops.metrics import Metrics
from daemon.protocol import Decoded, Limits, Received, Reject, decode_ingest, encode_ack

if TYPE_CHECKING:
    from daemon.protocol import Settled

Secure = Callable[["zmq.Socket[bytes]", str, str], None]  # (socket, name, endpoint): CURVE, or a warning


def decode_batch(received: list[Received], limits: Limits) -> Decoded:
    """Decode every message; a second copy of a ``(sensor, seq)`` in the same batch is a duplicate."""
    seen: set[tuple[str, int]] = set()
    out = Decoded(received, [], [], [])
    for r in received:
        d = decode_ingest(r.frames, limits)
        if isinstance(d, Reject):
            out.rejects.append((r, d))
        elif (d.sensor, d.seq) in seen:
            out.duplicates.append((r, d))
        else:
            seen.add((d.sensor, d.seq))
            out.events.append((r, d))
    return out


class Ingest:
    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], cfg: IngestConfig, metrics: Metrics, last_seq: dict[str, int]
    ) -> None:
        self.ctx, self.cfg, self.metrics = ctx, cfg, metrics
        self.log = logs.get()
        self.last_seq = last_seq  # the highest seq stored per sensor: a jump is a gap
        self.limits = Limits(
            max_channels=cfg.max_channels, min_samples=cfg.min_samples, max_message_bytes=cfg.max_message_bytes
        )
        self.router: zmq.Socket[bytes] | None = None
        self.pull: zmq.Socket[bytes] | None = None
        self.poller = zmq.Poller()
        self._acks = {s: metrics.acks.labels(s) for s in ("stored", "duplicate", "rejected")}

    def bind(self, secure: Secure) -> None:
        c = self.cfg
        # ZeroMQ's own cap is a wall above the configured one: messages between the two reach the decoder and are
        # rejected and counted as "oversize"; beyond the wall ZeroMQ drops the connection before reading them
        wall = 2 * c.max_message_bytes + 65_536
        for kind, name, endpoint in ((zmq.ROUTER, "ingest", c.endpoint), (zmq.PULL, "ingest_plain", c.plain_endpoint)):
            if not endpoint:
                continue
            sock = self.ctx.socket(kind)
            sock.setsockopt(zmq.MAXMSGSIZE, wall)
            sock.setsockopt(zmq.RCVHWM, c.queue_per_sender)
            sock.setsockopt(zmq.LINGER, 0)
            if kind == zmq.ROUTER:  # an ack for a peer that is gone fails (and is counted) instead of vanishing
                sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            secure(sock, name, endpoint)
            sock.bind(endpoint)
            self.poller.register(sock, zmq.POLLIN)
            if kind == zmq.ROUTER:
                self.router = sock
            else:
                self.pull = sock

    def endpoints(self) -> dict[str, str]:
        assert self.router is not None
        return {
            "ingest": self.router.getsockopt_string(zmq.LAST_ENDPOINT),
            "ingest_plain": self.pull.getsockopt_string(zmq.LAST_ENDPOINT) if self.pull else "",
        }

    def waiting(self) -> bool:
        """Whether a message is queued now."""
        return bool(self.poller.poll(0))

    def receive(self, timeout_ms: int, linger: bool = True) -> list[Received]:
        """Up to ``ingest.batch_max`` messages: wait ``timeout_ms`` for the first, then up to
        ``ingest.batch_wait_ms`` for more (``linger``) or only what is queued already."""
        if not self.poller.poll(timeout_ms):
            return []
        out: list[Received] = []
        deadline = time.monotonic() + (self.cfg.batch_wait_ms / 1000 if linger else 0.0)
        while len(out) < self.cfg.batch_max:
            got = False
            for sock, name in ((self.router, "ack"), (self.pull, "plain")):
                if sock is None:
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                got = True
                if name == "ack":
                    out.append(Received(frames[1:], frames[0], time.monotonic(), name))
                else:
                    out.append(Received(frames, None, time.monotonic(), name))
                self.metrics.received.labels(name).inc()
            if not got:
                left = deadline - time.monotonic()
                if left <= 0 or not self.poller.poll(int(left * 1000)):
                    break
        return out

    def ack(self, r: Received, sensor: str | None, seq: int | None, status: str, reason: str = "") -> None:
        """Answer a ROUTER sender. An ack that cannot be delivered (the peer is gone, or its queue is full) is
        counted in ``wingbeat_acks_undelivered_total``; the sender resends and is de-duplicated."""
        if r.identity is None or self.router is None:
            return
        try:
            self.router.send_multipart([r.identity, *encode_ack(sensor, seq, status, reason)], zmq.NOBLOCK)
        except zmq.Again:
            self.metrics.acks_undelivered.labels("queue_full").inc()
            return
        except zmq.ZMQError as e:
            self.metrics.acks_undelivered.labels("peer_gone" if e.errno == errno.EHOSTUNREACH else "error").inc()
            return
        self._acks[status].inc()

    def committed(self, s: Settled, rejects: list[tuple[Received, Reject]], n: int) -> None:
        """A batch of ``n`` messages is committed: ack it, and count and log it (once per batch and sensor)."""
        for a in s.acks:
            self.ack(a.received, a.sensor, a.seq, a.status, a.reason)
            if a.status == "duplicate":
                self.metrics.duplicates.inc()
        for r, j in rejects:
            self.metrics.rejected.labels(j.reason).inc()
            self.log.warning(
                "rejected", reason=j.reason, detail=j.detail, sensor=j.sensor, seq=j.seq, endpoint=r.endpoint
            )
        now, wall = time.monotonic(), time.time()
        per_sensor: dict[str, int] = {}
        for r, e, _ in s.stored:
            label = self.metrics.sensor(e.sensor)
            per_sensor[label] = per_sensor.get(label, 0) + 1
            last = self.last_seq.get(e.sensor)
            if last is not None and e.seq > last + 1:
                self.metrics.gaps.labels(label).inc(e.seq - last - 1)
                self.log.warning("sequence_gap", sensor=e.sensor, seq=e.seq, missing=e.seq - last - 1)
            if last is None or e.seq > last:
                self.last_seq[e.sensor] = e.seq
            self.metrics.ack_latency.observe(now - r.t)
        for label, k in per_sensor.items():
            self.metrics.stored.labels(label).inc(k)
            self.metrics.last_event.labels(label).set(wall)
        self.metrics.batch.observe(n)

    def close(self) -> None:
        """Stop taking input; unacked events are resent by their senders."""
        for s in (self.router, self.pull):
            if s is not None:
                s.close(linger=0)
