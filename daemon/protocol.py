"""Wire protocol v1 (DESIGN §2) as pure functions: frames in, an event or a named rejection out. No sockets.

Ingest, multipart: ``rec.<sensor>`` · UTF-8 JSON header · raw little-endian C-order samples.
Ack (ROUTER → DEALER): ``[b"ack", {"sensor", "seq", "status"}]`` with status ``stored`` (committed now),
``duplicate`` (committed earlier) or ``rejected`` (with ``reason``; resending will not help).
Output: ``cluster.<sensor>`` · UTF-8 JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeGuard

import numpy as np

VERSION = 1
SENSOR_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ("int16", "uint16", "int32", "float32", "float64")}
HEADER_KEYS = {"v", "sensor", "seq", "t0_ns", "fs", "dtype", "shape", "label", "meta"}
MAX_HEADER_BYTES = 16_384
MAX_META_BYTES = 4_096
MAX_LABEL_CHARS = 128
MAX_STRING_CHARS = 4_096  # any string in a header (a key or a value)
MAX_DEPTH = 16  # nesting of JSON objects and arrays in a header, the header itself being depth 1
INT_BOUND = 2**63  # every integer in a header is in [-2^63, 2^63): what SQLite stores
REFUSED = -2  # the event ID the store gives an event it could not hold (and quarantined): ack it as rejected

# Every reason a message can be refused for; metrics and quarantine use exactly these names.
REASONS = (
    "frames",  # not three frames
    "topic",  # topic not rec.<sensor>, or not the header's sensor
    "json",  # header not UTF-8 JSON object
    "version",  # v missing or not 1
    "header",  # a field missing, of the wrong type, or out of range
    "dtype",  # unknown sample type
    "length",  # payload length ≠ channels × samples × itemsize
    "too_few_samples",
    "too_many_channels",
    "too_many_samples",
    "non_finite",  # NaN or ±Inf in float samples
    "oversize",  # message above the size cap (refused by ZeroMQ on the socket, or counted here)
    "duplicate",  # (sensor, seq) already stored
    "featurise",  # decodable, but no spectrum can be made (constant signal, sample rate below the grid …)
    "encoding",  # a string in the header is not encodable UTF-8 (a lone surrogate) or is too long
    "nesting",  # the header's JSON nests deeper than MAX_DEPTH
    "store",  # decoded, but the store could not hold it (quarantined by the store, acked as rejected)
)


@dataclass(frozen=True)
class Limits:
    max_channels: int = 8
    min_samples: int = 64
    max_samples: int = 2_000_000
    max_message_bytes: int = 16 * 1024 * 1024


@dataclass
class Event:
    sensor: str
    seq: int
    t0_ns: int
    fs: float
    dtype: str
    channels: int
    samples: np.ndarray  # (channels, n) in the sender's dtype
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str
    sensor: str | None = None
    seq: int | None = None

    def __post_init__(self) -> None:
        assert self.reason in REASONS, self.reason


def _int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def json_problem(value: Any, max_depth: int = MAX_DEPTH, max_chars: int = MAX_STRING_CHARS) -> tuple[str, str] | None:
    """(reason, detail) of the first thing in a parsed JSON value that a store or a peer could not take, or None.

    Strings (keys too) must encode as UTF-8 (``json`` accepts lone surrogates such as ``"\\ud800"``, which SQLite
    and every encoder then refuse) and hold at most ``max_chars`` characters; integers lie in [-2^63, 2^63);
    floats are finite (``json`` reads ``NaN`` and ``1e999``); objects and arrays nest at most ``max_depth`` deep.
    Walked with an explicit stack: no input can exhaust the interpreter's recursion limit here."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if len(v) > max_chars:
                return "encoding", f"a string of {len(v)} characters (max {max_chars})"
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return "encoding", f"a string is not encodable UTF-8: {e.reason} at {e.start}: {v[:40]!r}"[:200]
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, int):
            if not -INT_BOUND <= v < INT_BOUND:
                return "header", f"an integer outside [-2^63, 2^63) ({len(str(abs(v)))} digits)"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return "header", f"a non-finite number {v!r}"
        elif isinstance(v, dict | list):
            if depth > max_depth:
                return "nesting", f"JSON nested deeper than {max_depth}"
            if isinstance(v, dict):
                stack.extend((k, depth) for k in v)
                stack.extend((x, depth + 1) for x in v.values())
            else:
                stack.extend((x, depth + 1) for x in v)
        else:
            return "header", f"a value of type {type(v).__name__}"
    return None


# What in a header's text could make ``json_problem`` find something: an escape (a lone surrogate is only ever
# written as one), an integer of 20 digits or of 19 from 9 (|n| ≥ 2^63 needs either), an exponent or NaN/Infinity
# (a float overflows only so, or with 309 digits). Matches inside strings only send a header the long way.
_RISKY = re.compile(rb"\\u|\d{20}|9\d{18}|\d[eE]|NaN|Infinity")


def plainly_bounded(raw: bytes, max_depth: int = MAX_DEPTH, max_chars: int = MAX_STRING_CHARS) -> bool:
    """Whether a header's UTF-8 text (valid) is short and plain enough that ``json_problem`` cannot find anything
    in what ``json.loads`` makes of it: no string longer than the text, no container deeper than there are
    brackets, and nothing ``_RISKY``. Scans in C, several times cheaper than the walk; False only means: walk."""
    return len(raw) <= max_chars and raw.count(b"{") + raw.count(b"[") <= max_depth and _RISKY.search(raw) is None


def decode_ingest(frames: list[bytes], limits: Limits = Limits()) -> Event | Reject:
    """Decode one ingest message; never raises on any input."""
    if sum(len(f) for f in frames) > limits.max_message_bytes:
        return Reject("oversize", f"{sum(len(f) for f in frames)} bytes > {limits.max_message_bytes}")
    if len(frames) != 3:
        return Reject("frames", f"expected 3 frames (topic, header, payload), got {len(frames)}")
    topic, raw_header, payload = frames
    if len(raw_header) > MAX_HEADER_BYTES:
        return Reject("header", f"header is {len(raw_header)} bytes (max {MAX_HEADER_BYTES})")
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also an integer of > 4300 digits
        return Reject("json", f"header is not UTF-8 JSON: {str(e)[:80]}")
    if not isinstance(header, dict):
        return Reject("json", f"header is a JSON {type(header).__name__}, not an object")
    sensor = header.get("sensor")
    seq = header.get("seq")
    s_ok: str | None = sensor if isinstance(sensor, str) and SENSOR_RE.fullmatch(sensor) else None
    q_ok: int | None = seq if _int(seq) and 0 <= seq < 2**63 else None

    def rej(reason: str, detail: str) -> Reject:
        return Reject(reason, detail, s_ok, q_ok)

    problem = None if plainly_bounded(raw_header) else json_problem(header)
    if problem is not None:
        return rej(*problem)

    if header.get("v") != VERSION or isinstance(header.get("v"), bool):
        return rej("version", f"v must be {VERSION}, got {header.get('v')!r}"[:120])
    if s_ok is None:
        return rej("header", "sensor must match [A-Za-z0-9_.-]{1,64}")
    if q_ok is None:
        return rej("header", "seq must be an integer in [0, 2^63)")
    try:
        topic_s = topic.decode("ascii")
    except UnicodeDecodeError:
        topic_s = ""
    if topic_s != f"rec.{s_ok}":
        return rej("topic", f"topic {topic[:80]!r} is not rec.{sensor}")
    unknown = set(header) - HEADER_KEYS
    if unknown:
        return rej("header", f"unknown header keys {sorted(unknown)[:5]}")
    t0, fs = header.get("t0_ns"), header.get("fs")
    if not (_int(t0) and 0 <= t0 < 2**63):
        return rej("header", "t0_ns must be an integer ns since the Unix epoch")
    if not (isinstance(fs, int | float) and not isinstance(fs, bool) and 0 < fs <= 1e7 and math.isfinite(fs)):
        return rej("header", f"fs must be a number in (0, 1e7] Hz, got {fs!r}"[:120])
    label = header.get("label", "")
    if not isinstance(label, str) or len(label) > MAX_LABEL_CHARS:
        return rej("header", f"label must be a string of at most {MAX_LABEL_CHARS} characters")
    meta = header.get("meta", {})
    if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_META_BYTES:
        return rej("header", f"meta must be a JSON object of at most {MAX_META_BYTES} bytes")
    dtype = header.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        return rej("dtype", f"dtype {dtype!r} is not one of {sorted(DTYPES)}"[:160])
    shape = header.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_int(v) for v in shape)):
        return rej("header", "shape must be [channels, samples] integers")
    channels, n = shape
    if channels < 1 or channels > limits.max_channels:
        return rej("too_many_channels", f"{channels} channels (allowed 1–{limits.max_channels})")
    if n < limits.min_samples:
        return rej("too_few_samples", f"{n} samples per channel (need ≥ {limits.min_samples})")
    if n > limits.max_samples:
        return rej("too_many_samples", f"{n} samples per channel (max {limits.max_samples})")
    dt = DTYPES[dtype]
    if len(payload) != channels * n * dt.itemsize:
        return rej("length", f"payload {len(payload)} bytes ≠ {channels} × {n} × {dt.itemsize} for {dtype}")
    samples = np.frombuffer(payload, dtype=dt).reshape(channels, n)
    if dt.kind == "f" and not np.isfinite(samples).all():
        return rej("non_finite", "samples contain NaN or Inf")
    return Event(s_ok, q_ok, t0, float(fs), dtype, channels, samples, label, meta)


def encode_ingest(event: Event) -> list[bytes]:
    header = {
        "v": VERSION,
        "sensor": event.sensor,
        "seq": event.seq,
        "t0_ns": event.t0_ns,
        "fs": event.fs,
        "dtype": event.dtype,
        "shape": [event.channels, int(event.samples.shape[-1])],
    }
    if event.label:
        header["label"] = event.label
    if event.meta:
        header["meta"] = event.meta
    data = np.ascontiguousarray(event.samples, dtype=DTYPES[event.dtype]).tobytes()
    return [f"rec.{event.sensor}".encode(), json.dumps(header).encode(), data]


def encode_ack(sensor: str | None, seq: int | None, status: str, reason: str = "") -> list[bytes]:
    body: dict[str, Any] = {"sensor": sensor, "seq": seq, "status": status}
    if reason:
        body["reason"] = reason
    return [b"ack", json.dumps(body).encode()]


def decode_ack(frames: list[bytes]) -> dict[str, Any] | None:
    """The ack's body, or None for anything that is not a well-formed ack."""
    if len(frames) != 2 or frames[0] != b"ack":
        return None
    try:
        body = json.loads(frames[1])
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("status") not in ("stored", "duplicate", "rejected"):
        return None
    return body


@dataclass(frozen=True)
class Output:
    """One event's output: built once (``daemon.serve.pipeline.outputs``), stored, read back for a republish and sent
    with the same fields. ``rec_error`` is kept in the store for drift; the wire does not carry it."""

    event_id: int
    sensor: str
    seq: int
    t0_ns: int
    model_version: int
    cluster: int  # stable ID, −1 = novel / unknown
    probability: float
    novelty: float
    rec_error: float
    latent: tuple[float, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "event_id": self.event_id,
            "sensor": self.sensor,
            "seq": self.seq,
            "t0_ns": self.t0_ns,
            "latent": list(self.latent),
            "cluster": self.cluster,
            "probability": self.probability,
            "novelty": self.novelty,
            "model_version": self.model_version,
        }


def encode_output(output: Output) -> list[bytes]:
    return [f"cluster.{output.sensor}".encode(), json.dumps(output.to_wire()).encode()]


# The records the stages hand each other: ingest → pipeline → store → ingest (acks), and the network's pooled
# events. Kept here, beside the wire's own records, so that no stage imports another for a type.


@dataclass(frozen=True)
class Received:
    frames: list[bytes]
    identity: bytes | None  # ROUTER peer to ack; None for the plain endpoint (nobody to ack)
    t: float  # monotonic receive time
    endpoint: str  # "ack" or "plain"


@dataclass
class Decoded:
    """A received micro-batch, decoded: events unique within the batch, rejections, and repeated copies."""

    received: list[Received]
    events: list[tuple[Received, Event]]
    rejects: list[tuple[Received, Reject]]
    duplicates: list[tuple[Received, Event]]


class Quarantined(NamedTuple):
    """A rejected message as the quarantine table keeps it."""

    reason: str
    detail: str
    sensor: str | None
    seq: int | None
    frames: bytes  # the message's frames joined by NUL, capped
    endpoint: str  # "ack" (ROUTER) or "plain" (PULL)


@dataclass(frozen=True)
class Ack:
    received: Received
    sensor: str | None
    seq: int | None
    status: str  # stored | duplicate | rejected
    reason: str = ""


@dataclass
class Settled:
    stored: list[tuple[Received, Event, int]]  # newly stored events with their IDs
    acks: list[Ack]  # every ack of the batch
    outputs: list[Output]  # outputs stored with the batch, with their event IDs
    refused: list[tuple[Received, Reject]] = field(default_factory=list)  # decoded, but the store refused them


@dataclass(frozen=True)
class Pooled:
    """An event as a station forwarded it: metadata, features (float32 bytes) and, optionally, raw samples."""

    station: str
    sensor: str
    seq: int
    t0_ns: int
    fs: float
    dtype: str
    channels: int
    n_samples: int
    label: str
    meta: dict[str, Any]
    features: bytes
    raw: bytes | None
