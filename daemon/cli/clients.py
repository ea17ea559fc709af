"""Reference clients: ``replay`` (a DEALER sender with acks, resends and a bounded window) and ``tail`` (a SUB)."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon.data.datasets import Recordings
from daemon.ops.security import secure_client
from daemon.protocol import Event, decode_ack, encode_ingest

DTYPE_NAMES = {np.dtype(n): n for n in ("int16", "uint16", "int32", "float32", "float64")}


@dataclass
class ReplayResult:
    """What one ``replay`` did, counted in events (one event is one ``(sensor, seq)``).

    sent : events ZeroMQ accepted at least once. A send is never allowed to block: an event ZeroMQ refuses (its
        send queue full, e.g. no daemon to take it) is not sent; it is kept and offered again later.
    acked : events the daemon acknowledged as stored; ``duplicates`` of them were stored before.
    resent : extra copies ZeroMQ accepted after ``ack_timeout_s`` without an ack.
    deferred : sends ZeroMQ refused with its queue full (each is offered again later; none blocked).
    rejected : events the daemon refused, by reason (never resent).
    unacked : events taken from the source and neither acked nor rejected when ``replay`` returned, whether sent
        or still waiting for ZeroMQ to accept them; events never taken from the source are not counted.
    seconds : wall time of the whole replay.
    """

    sent: int = 0
    acked: int = 0
    resent: int = 0
    duplicates: int = 0
    deferred: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "resent": self.resent,
            "duplicates": self.duplicates,
            "deferred": self.deferred,
            "rejected": self.rejected,
            "unacked": self.unacked,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.events_per_s, 1),
        }


@dataclass(frozen=True)
class Curve:
    """A CURVE client's keys: its own secret certificate and the daemon's public one (``wingbeat keys``)."""

    client_secret: Path
    server_public: Path


def _socket(kind: int, curve: Curve | None) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        try:
            secure_client(sock, curve.client_secret, curve.server_public)
        except BaseException:
            sock.close()
            raise
    return sock


def events_of(rec: Recordings, sensor: str, start_seq: int, sensor_from_file: bool) -> Iterator[Event]:
    dtype = DTYPE_NAMES.get(rec.samples.dtype.newbyteorder("=")) or DTYPE_NAMES.get(rec.samples.dtype)
    if dtype is None:
        raise ValueError(f"samples have dtype {rec.samples.dtype}; the protocol carries {sorted(DTYPE_NAMES.values())}")
    per_sensor: dict[str, int] = {}
    now = time.time_ns()
    for i in range(len(rec)):
        name = str(rec.sensor[i]) if sensor_from_file and rec.sensor[i] else sensor
        seq = per_sensor.get(name, start_seq)
        per_sensor[name] = seq + 1
        t0 = int(rec.t0_ns[i]) if rec.t0_ns[i] > 0 else now + i
        x = rec.event(i)
        yield Event(name, seq, t0, float(rec.fs[i]), dtype, int(x.shape[0]), x, str(rec.label[i]))


def _offer(sock: zmq.Socket[bytes], frames: list[bytes]) -> bool:
    """Hand ``frames`` to ZeroMQ without waiting: False when its send queue is full (nothing was queued)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def replay(
    events: Iterator[Event],
    endpoint: str,
    rate: float = 0.0,
    window: int = 256,
    ack_timeout_s: float = 5.0,
    give_up_s: float = 120.0,
    on_ack: Callable[[dict[str, Any], float], None] | None = None,
    curve: Curve | None = None,
) -> ReplayResult:
    """Send ``events``; keep at most ``window`` unacked; resend any unacked after ``ack_timeout_s``.

    Returns when every event is acked (or rejected: resending a rejected event cannot help), or when no ack has
    come for ``give_up_s`` seconds (the rest count as unacked). No send blocks: with no daemon, or with ZeroMQ's
    send queue full of resends, an event waits here (still unacked, not yet sent) while the give-up clock runs.
    ``rate`` > 0 paces sending (events per second). ``on_ack(body, seconds since first send)`` sees each event's
    first ack. ``curve``: connect with these keys. See ``ReplayResult`` for what is counted.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not ack_timeout_s > 0:
        raise ValueError(f"ack_timeout_s must be > 0 seconds, got {ack_timeout_s}")
    if not give_up_s > 0:
        raise ValueError(f"give_up_s must be > 0 seconds, got {give_up_s}")
    if not rate >= 0:
        raise ValueError(f"rate must be >= 0 events per second, got {rate}")
    sock = _socket(zmq.DEALER, curve)
    sock.connect(endpoint)
    res = ReplayResult()
    # (sensor, seq) -> (frames, first send, last send), ordered by last send: only the oldest can be due
    inflight: OrderedDict[tuple[str, int], tuple[list[bytes], float, float]] = OrderedDict()
    held: tuple[tuple[str, int], list[bytes]] | None = None  # taken from the source, not yet accepted by ZeroMQ
    source = iter(events)
    exhausted = False
    start = time.monotonic()
    last_progress = start
    next_send = start
    blocked = False  # ZeroMQ refused a send on the last turn: wait for it to take more (POLLOUT) as well as acks
    try:
        while not exhausted or inflight or held is not None:
            now = time.monotonic()
            if now - last_progress > give_up_s:
                break
            blocked = False
            while len(inflight) < window:
                if held is None:
                    if exhausted or (rate > 0 and now < next_send):
                        break
                    try:
                        ev = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    held = ((ev.sensor, ev.seq), encode_ingest(ev))
                    if rate > 0:
                        next_send = max(next_send + 1 / rate, now - 1.0)
                if not _offer(sock, held[1]):
                    res.deferred += 1
                    blocked = True
                    break
                inflight[held[0]] = (held[1], now, now)
                held = None
                res.sent += 1
                now = time.monotonic()
            while inflight and not blocked:
                key, (frames, first, sent_at) = next(iter(inflight.items()))
                if now - sent_at < ack_timeout_s:
                    break
                if not _offer(sock, frames):  # stays due; offered again next turn
                    res.deferred += 1
                    blocked = True
                    break
                inflight.move_to_end(key)
                inflight[key] = (frames, first, now)
                res.resent += 1
            wait_ms = 50
            if rate > 0 and not exhausted and held is None:
                wait_ms = int(max(0, min(50, (next_send - time.monotonic()) * 1000)))
            ready = sock.poll(wait_ms, zmq.POLLIN | (zmq.POLLOUT if blocked else 0))
            if not ready & zmq.POLLIN:
                continue
            while True:
                try:
                    reply = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                body = decode_ack(reply)
                if body is None:
                    continue
                key = (body.get("sensor"), body.get("seq"))  # type: ignore[assignment]
                entry = inflight.pop(key, None)
                if entry is None:
                    continue  # an ack for a resent copy that was acked already
                last_progress = time.monotonic()
                if body["status"] == "rejected":
                    reason = str(body.get("reason", "?"))
                    res.rejected[reason] = res.rejected.get(reason, 0) + 1
                else:
                    res.acked += 1
                    res.duplicates += body["status"] == "duplicate"
                if on_ack is not None:
                    on_ack(body, last_progress - entry[1])
    finally:
        res.unacked = len(inflight) + (held is not None)
        res.seconds = time.monotonic() - start
        sock.close(linger=0)
    return res


def tail(
    endpoint: str,
    topic: str,
    count: int,
    timeout_s: float,
    emit: Callable[[dict[str, Any]], None],
    curve: Curve | None = None,
) -> int:
    """Print outputs as they come; stop after ``count`` (0 = no limit) or ``timeout_s`` seconds without one.

    Returns how many were emitted. Every wait is bounded by what is left of ``timeout_s``; a message that is not
    a JSON object is skipped and does not restart that clock.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    sock = _socket(zmq.SUB, curve)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)
    n = 0
    last = time.monotonic()
    try:
        while count <= 0 or n < count:
            left = timeout_s - (time.monotonic() - last)
            if left <= 0:
                break
            if not sock.poll(max(1, math.ceil(left * 1000))):
                continue  # the poll may wake a little early: the loop checks the clock again
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            try:
                body = json.loads(frames[-1])
            except ValueError:
                continue
            if isinstance(body, dict):
                emit(body)
                n += 1
                last = time.monotonic()
    finally:
        sock.close(linger=0)
    return n
