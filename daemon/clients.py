"""Reference clients: ``replay`` (a DEALER sender with acks, resends and a bounded window) and ``tail`` (a SUB)."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon.datasets import Recordings
from daemon.protocol import Event, decode_ack, encode_ingest
from daemon.security import secure_client

DTYPE_NAMES = {np.dtype(n): n for n in ("int16", "uint16", "int32", "float32", "float64")}


@dataclass
class ReplayResult:
    sent: int = 0
    acked: int = 0
    resent: int = 0
    duplicates: int = 0
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
    come for ``give_up_s`` (the rest count as unacked). ``rate`` > 0 paces sending (events per second).
    ``on_ack(body, seconds since first send)`` sees each ack. ``curve``: connect with these keys.
    """
    sock = _socket(zmq.DEALER, curve)
    sock.connect(endpoint)
    res = ReplayResult()
    inflight: OrderedDict[tuple[str, int], tuple[list[bytes], float, float]] = OrderedDict()
    source = iter(events)
    exhausted = False
    start = time.monotonic()
    last_progress = start
    next_send = start
    try:
        while not exhausted or inflight:
            now = time.monotonic()
            while not exhausted and len(inflight) < window and (rate <= 0 or now >= next_send):
                try:
                    ev = next(source)
                except StopIteration:
                    exhausted = True
                    break
                frames = encode_ingest(ev)
                sock.send_multipart(frames)
                inflight[(ev.sensor, ev.seq)] = (frames, now, now)
                res.sent += 1
                if rate > 0:
                    next_send = max(next_send + 1 / rate, now - 1.0)
                now = time.monotonic()
            wait_ms = 50
            if rate > 0 and not exhausted:
                wait_ms = int(max(0, min(50, (next_send - time.monotonic()) * 1000)))
            if sock.poll(wait_ms, zmq.POLLIN):
                while True:
                    try:
                        reply = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    body = decode_ack(reply)
                    if body is None:
                        continue
                    key = (body.get("sensor"), body.get("seq"))
                    entry = inflight.pop(key, None)  # type: ignore[arg-type]
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
            now = time.monotonic()
            while inflight:  # ordered by last send time: only the oldest can be due
                key, (frames, first, sent_at) = next(iter(inflight.items()))
                if now - sent_at < ack_timeout_s:
                    break
                sock.send_multipart(frames)
                inflight.move_to_end(key)
                inflight[key] = (frames, first, now)
                res.resent += 1
            if inflight and now - last_progress > give_up_s:
                break
    finally:
        res.unacked = len(inflight)
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
    """Print outputs as they come; stop after ``count`` (0 = no limit) or ``timeout_s`` without one. Returns count."""
    sock = _socket(zmq.SUB, curve)
    sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)
    n = 0
    try:
        while count <= 0 or n < count:
            if not sock.poll(int(timeout_s * 1000)):
                break
            frames = sock.recv_multipart()
            try:
                body = json.loads(frames[-1])
            except ValueError:
                continue
            if isinstance(body, dict):
                emit(body)
                n += 1
    finally:
        sock.close(linger=0)
    return n
