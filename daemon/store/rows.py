"""One row at a time, when a batch cannot be stored whole: each event is tried in its own savepoint, and an event
the store cannot hold (a string SQLite cannot encode, an integer beyond 64 bits, JSON nested past the encoder's
limit …) is quarantined with its reason instead of failing the batch. Disk and locking errors
(``sqlite3.OperationalError``) are not an event's fault: they propagate, and the whole batch rolls back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from daemon.protocol import REFUSED, Event, Output, Pooled

INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (station, sensor, seq, t0_ns, fs, dtype, channels, n_samples, label, meta,"
    " received_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
)
INSERT_QUARANTINE = (
    "INSERT INTO quarantine (received_ns, reason, detail, sensor, seq, frames, endpoint) VALUES (?,?,?,?,?,?,?)"
)


def insert_event(db: sqlite3.Connection, station: str, e: Event | Pooled, n_samples: int, now: int) -> int:
    """An event's row (a daemon's own: station ''); its ID, or −1 when (station, sensor, seq) is stored already."""
    meta = json.dumps(e.meta) if e.meta else "{}"
    row = (station, e.sensor, e.seq, e.t0_ns, e.fs, e.dtype, e.channels, n_samples, e.label, meta, now)
    cur = db.execute(INSERT_EVENT, row)
    return int(cur.lastrowid or 0) if cur.rowcount else -1


def output_row(o: Output, event_id: int) -> tuple[Any, ...]:
    return (event_id, o.model_version, o.cluster, o.probability, o.novelty, o.rec_error, json.dumps(list(o.latent)))


def safe_text(s: Any, cap: int = 300) -> str:
    """Any value as text SQLite can take: lone surrogates and other unencodable characters escaped."""
    text = s if isinstance(s, str) else repr(s)
    return text[:cap].encode("utf-8", "backslashreplace").decode("utf-8")


def safe_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63 else None


def what(err: BaseException) -> str:
    return safe_text(f"the store refused it: {type(err).__name__}: {err}")


def snapshot(fields: dict[str, Any], cap: int) -> bytes:
    """What the quarantine keeps of an event the store refused (its frames are gone by then): its header fields
    as ASCII JSON, each one that cannot be written so (nested too deep, say) named by its type instead."""
    parts: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            parts[key] = json.loads(json.dumps(value, default=repr))
        except (ValueError, TypeError, RecursionError):
            parts[key] = f"<{type(value).__name__} not representable>"
    return json.dumps(parts).encode("ascii", "backslashreplace")[:cap]


def refused_row(e: Event, now: int, err: BaseException) -> tuple[Any, ...]:
    """The quarantine row of a decoded event the store could not hold."""
    fields = {"sensor": e.sensor, "seq": e.seq, "t0_ns": e.t0_ns, "label": e.label, "meta": e.meta}
    sensor = e.sensor if isinstance(e.sensor, str) and e.sensor.isascii() else None
    return (now, "store", what(err), sensor, safe_int(e.seq), snapshot(fields, 4096), "")


def each_in_savepoint(
    db: sqlite3.Connection,
    n: int,
    insert: Callable[[int], int],
    quarantine: Callable[[int, BaseException], tuple[Any, ...]],
) -> list[int]:
    """Inside an open transaction: ``insert(k)`` for k in 0…n−1, each in its own savepoint; returns the IDs it
    returned, ``REFUSED`` where it raised anything but ``OperationalError``, having rolled that event back and
    written ``quarantine(k, error)`` (a quarantine row without ``received_ns``) instead."""
    ids: list[int] = []
    for k in range(n):
        db.execute("SAVEPOINT one_event")
        try:
            ids.append(insert(k))
        except sqlite3.OperationalError:
            raise
        except Exception as err:
            db.execute("ROLLBACK TO one_event")
            db.execute(INSERT_QUARANTINE, quarantine(k, err))
            ids.append(REFUSED)
        db.execute("RELEASE one_event")
    return ids


def insert_quarantine_rows(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Rejected messages' quarantine rows, made safe one by one when the batch insert fails on one of them."""
    db.execute("SAVEPOINT quarantine_rows")
    try:
        db.executemany(INSERT_QUARANTINE, rows)
        db.execute("RELEASE quarantine_rows")
        return
    except sqlite3.OperationalError:
        raise
    except Exception:
        db.execute("ROLLBACK TO quarantine_rows")
        db.execute("RELEASE quarantine_rows")
    for r in rows:
        now, reason, detail, sensor, seq, frames, endpoint = r
        db.execute(
            INSERT_QUARANTINE,
            (now, safe_text(reason, 40), safe_text(detail), None if sensor is None else safe_text(sensor, 64),
             safe_int(seq), bytes(frames) if isinstance(frames, bytes | bytearray) else b"", safe_text(endpoint, 16)),
        )  # fmt: skip
