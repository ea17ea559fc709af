"""The network's wire, pure: the event message a station forwards and the centre decodes, message IDs, subjects,
and model versions packed as one object. No sockets, no NATS (``daemon.net.link`` is the stage around them).

The event message (``wingbeat.events.<station>.<sensor>``): a 4-byte big-endian header length, the UTF-8 JSON
header, the features (float32 little-endian, ``features.shape``), then the raw samples (``raw_bytes`` of them,
``dtype`` little-endian, (channels, n_samples)) when the station forwards them. No pickle anywhere.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from daemon.protocol import DTYPES, INT_BOUND, SENSOR_RE, Limits, Output, Pooled, json_problem
from model.checkpoint import FILES

WIRE_VERSION = 1
EVENTS = "wingbeat.events"  # .<station>.<sensor>
OUTPUTS = "wingbeat.out"  # .<station>.<cluster>
STATION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
VERSION_NAME = re.compile(r"v(\d+)")
MAX_HEADER_BYTES = 16_384
MAX_VERSION_BYTES = 512 * 1024**2
QUARANTINE_FRAME_BYTES = 65_536
MAX_BINS = 65_536  # feature bins per channel
LIMITS = Limits()  # the local codec's bounds on channels and samples hold for pooled events too
# why the centre quarantines a message: "subject" = the body's station or sensor, or the message ID, is not the
# subject's; "encoding"/"nesting" as in ``daemon.protocol.json_problem``; "store" = the pooled store refused it
# "decode" = decoding raised something else (a bug's, quarantined all the same)
REASONS = ("frame", "json", "header", "features", "raw", "subject", "encoding", "nesting", "store", "decode")
MAX_DELIVER = 20  # deliveries of one message at the centre before JetStream gives up on it


class WireError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---- the wire: pure ----------------------------------------------------------------------------------------------
def msg_id(station: str, sensor: str, seq: int) -> str:
    return f"{station}/{sensor}/{seq}"


def encode_event(station: str, row: tuple[Any, ...], features: dict[str, Any]) -> tuple[str, bytes, str]:
    """(subject, body, message ID) of one outbox row (``Store.outbox``); ``features``: how they were made."""
    _, sensor, seq, t0_ns, fs, dtype, channels, n_samples, label, meta, data, raw = row
    header = {
        "v": WIRE_VERSION,
        "station": station,
        "sensor": sensor,
        "seq": seq,
        "t0_ns": t0_ns,
        "fs": fs,
        "dtype": dtype,
        "channels": channels,
        "n_samples": n_samples,
        "label": label,
        "meta": json.loads(meta),
        "features": {"dtype": "float32", "shape": [channels, len(data) // 4 // max(1, channels)], "config": features},
        "raw_bytes": len(raw) if raw is not None else 0,
    }
    h = json.dumps(header, separators=(",", ":")).encode()
    body = len(h).to_bytes(4, "big") + h + bytes(data) + (bytes(raw) if raw is not None else b"")
    return f"{EVENTS}.{station}.{sensor}", body, msg_id(station, sensor, seq)


def subject_names(subject: str) -> tuple[str, str] | None:
    """(station, sensor) of an event subject ``wingbeat.events.<station>.<sensor>``, or None."""
    prefix = EVENTS + "."
    if not subject.startswith(prefix):
        return None
    station, _, sensor = subject[len(prefix) :].partition(".")
    if not STATION_RE.fullmatch(station) or not SENSOR_RE.fullmatch(sensor):
        return None
    return station, sensor


def decode_event(
    body: bytes, features: dict[str, Any] | None, subject: str | None = None, message_id: str | None = None
) -> Pooled:
    """An event message back into a store row; WireError names what is wrong. ``features``: the feature config
    this store's events were made with (None: any).

    ``subject``: where the message was published. The station is the subject's (the server's permissions let a
    station's credentials publish only on its own subjects); a body naming another station or sensor is refused,
    and so is a ``message_id`` other than the one built from the subject and the body's ``seq``. Never raises
    anything but WireError."""
    if len(body) < 4:
        raise WireError("frame", f"{len(body)} bytes, shorter than the header length")
    n = int.from_bytes(body[:4], "big")
    if not 2 <= n <= MAX_HEADER_BYTES or len(body) < 4 + n:
        raise WireError("frame", f"header length {n} does not fit a body of {len(body)} bytes")
    try:
        h = json.loads(body[4 : 4 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also an int of > 4300 digits
        raise WireError("json", f"header is not UTF-8 JSON: {str(e)[:120]}") from None
    if not isinstance(h, dict) or h.get("v") != WIRE_VERSION:
        raise WireError("header", f"not a version {WIRE_VERSION} header")
    problem = json_problem(h)
    if problem is not None:
        raise WireError(*problem)

    def want(key: str, kind: type | tuple[type, ...]) -> Any:
        v = h.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise WireError("header", f"{key}: must be {getattr(kind, '__name__', kind)}, got {v!r}"[:200])
        return v

    station, sensor = want("station", str), want("sensor", str)
    if not STATION_RE.fullmatch(station):
        raise WireError("header", f"station: not [A-Za-z0-9_-]{{1,64}}: {station!r}"[:200])
    if not SENSOR_RE.fullmatch(sensor):
        raise WireError("header", f"sensor: not a sensor name: {sensor!r}"[:200])
    seq, t0, fs = want("seq", int), want("t0_ns", int), want("fs", (int, float))
    dtype, channels, n_samples = want("dtype", str), want("channels", int), want("n_samples", int)
    label, meta, feat = want("label", str), want("meta", dict), want("features", dict)
    raw_bytes = want("raw_bytes", int)
    if not (0 <= seq < INT_BOUND and 0 <= t0 < INT_BOUND and 0 < fs <= 1e7):
        raise WireError("header", "seq and t0_ns must lie in [0, 2^63), fs in (0, 1e7] Hz")
    if not (1 <= channels <= LIMITS.max_channels and 1 <= n_samples <= LIMITS.max_samples and dtype in DTYPES):
        raise WireError("header", f"channels (1–{LIMITS.max_channels}), n_samples or dtype out of range")
    if not 0 <= raw_bytes <= LIMITS.max_message_bytes or len(label) > 128:
        raise WireError("header", "raw_bytes or label out of range")
    if subject is not None:
        names = subject_names(subject)
        if names != (station, sensor):
            raise WireError("subject", f"body says {station}/{sensor}, subject is {subject[:160]!r}")
    if message_id is not None and message_id != msg_id(station, sensor, seq):
        raise WireError("subject", f"message ID {message_id[:160]!r} is not {msg_id(station, sensor, seq)!r}")
    shape = feat.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise WireError("features", f"shape: must be [channels, bins], got {shape!r}"[:200])
    if shape[0] != channels or shape[1] > MAX_BINS:
        raise WireError("features", f"shape {shape} for {channels} channels (at most {MAX_BINS} bins)")
    if features is not None and feat.get("config") != features:
        raise WireError("features", f"made with {feat.get('config')!r}, this store's with {features!r}"[:300])
    size = shape[0] * shape[1] * 4
    if len(body) != 4 + n + size + raw_bytes:
        raise WireError("features", f"body is {len(body)} bytes, header says {4 + n + size + raw_bytes}")
    if raw_bytes and raw_bytes != channels * n_samples * DTYPES[dtype].itemsize:
        raise WireError("raw", f"{raw_bytes} bytes of raw samples for {channels} × {n_samples} {dtype}")
    data = body[4 + n : 4 + n + size]
    if not np.isfinite(np.frombuffer(data, "<f4")).all():
        raise WireError("features", "features contain NaN or Inf")
    raw = body[4 + n + size :] if raw_bytes else None
    return Pooled(station, sensor, seq, t0, float(fs), dtype, channels, n_samples, label, meta, data, raw)


def stale_versions(names: list[str], keep: int) -> list[str]:
    """The version objects (``v<N>``) of a bucket listing beyond the newest ``keep``, oldest first; other names
    are not versions and are left alone."""
    numbered = sorted((int(m.group(1)), n) for n in names if (m := VERSION_NAME.fullmatch(n)))
    return [n for _, n in numbered[: max(0, len(numbered) - keep)]]


def pack_version(path: Path) -> bytes:
    """A model version directory as one object: an uncompressed tar of its files, nothing else."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in FILES:
            data = (path / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_version(data: bytes, dest: Path) -> Path:
    """Write the files of a packed version into a fresh directory ``dest`` (only the version's own file names,
    plain files; no paths, links or devices). ``read_version`` checks what they hold."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar.getmembers():
                if m.name not in FILES or not m.isfile():
                    raise ValueError(f"unexpected member {m.name!r} in a model version")
                f = tar.extractfile(m)
                assert f is not None
                (tmp / m.name).write_bytes(f.read())
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def output_subject(station: str, o: Output) -> str:
    return f"{OUTPUTS}.{station}.{o.cluster}"
