"""The store's tables of the network (``daemon.net.link``, DESIGN §9): a station's outbox (its own events above the
forwarded watermark) and the centre's pooled events. Methods of ``daemon.store.db.Store``, kept in their own module."""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from typing import Any

from daemon.protocol import Pooled, Quarantined
from daemon.store.rows import each_in_savepoint, insert_event, insert_quarantine_rows, safe_int, snapshot, what


class NetworkTables:
    """Mixed into ``Store``: its connection, transaction helper and raw-byte count are the store's."""

    db: sqlite3.Connection
    _raw_bytes: int | None

    def _tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError  # Store's

    # ---- the network (daemon.net.link): the station's outbox, the centre's pooled events ----------------------
    def ingest_pooled(self, events: list[Pooled], rejects: list[Quarantined]) -> list[int]:
        """Store events forwarded by stations, with their features, and malformed messages, in one transaction;
        return event IDs (−1: that (station, sensor, seq) is stored already, a redelivery; ``REFUSED``: the store
        could not hold that event and quarantined it instead). Disk and locking errors raise, having rolled back;
        any other is one event's, found by storing the batch again event by event."""
        try:
            return self._ingest_pooled(events, rejects, one_by_one=False)
        except sqlite3.OperationalError:
            raise
        except Exception:
            return self._ingest_pooled(events, rejects, one_by_one=True)

    def _ingest_pooled(self, events: list[Pooled], rejects: list[Quarantined], one_by_one: bool) -> list[int]:
        now = time.time_ns()
        added = 0

        def insert(k: int) -> int:
            nonlocal added
            p = events[k]
            eid = insert_event(self.db, p.station, p, p.n_samples, now)
            if eid < 0:
                return -1
            self.db.execute("INSERT INTO features VALUES (?, ?)", (eid, p.features))
            if p.raw is not None:
                self.db.execute("INSERT INTO raw VALUES (?, ?)", (eid, p.raw))
                added += len(p.raw)
            return eid

        def refused(k: int, err: BaseException) -> tuple[Any, ...]:
            p = events[k]
            fields = {"station": p.station, "sensor": p.sensor, "seq": p.seq, "label": p.label, "meta": p.meta}
            sensor = p.sensor if isinstance(p.sensor, str) and p.sensor.isascii() else None
            return (now, "store", what(err), sensor, safe_int(p.seq), snapshot(fields, 4096), "nats")

        with self._tx():
            if one_by_one:
                ids = each_in_savepoint(self.db, len(events), insert, refused)
            else:
                ids = [insert(k) for k in range(len(events))]
            insert_quarantine_rows(self.db, [(now, *q) for q in rejects])
        if self._raw_bytes is not None:
            self._raw_bytes += added
        return ids

    def forwarded(self) -> int:
        """The outbox watermark: this daemon's events up to this ID are acked by JetStream."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'forwarded'").fetchone()
        return int(row[0]) if row else 0

    def set_forwarded(self, event_id: int) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('forwarded', ?)", (str(event_id),))

    def outbox(self, after_id: int, limit: int, raw: bool) -> list[tuple[Any, ...]]:
        """This daemon's own events above ``after_id``, oldest first: (id, sensor, seq, t0_ns, fs, dtype, channels,
        n_samples, label, meta, features, raw samples or None)."""
        samples = "(SELECT samples FROM raw r WHERE r.event_id = e.id)" if raw else "NULL"
        return self.db.execute(
            "SELECT e.id, e.sensor, e.seq, e.t0_ns, e.fs, e.dtype, e.channels, e.n_samples, e.label, e.meta, f.data,"
            f" {samples} FROM events e JOIN features f ON f.event_id = e.id WHERE e.id > ? AND e.station = ''"
            " ORDER BY e.id LIMIT ?",
            (after_id, limit),
        ).fetchall()

    def outbox_depth(self, after_id: int) -> tuple[int, int | None]:
        """(events above ``after_id`` not yet forwarded, received_ns of the oldest of them or None)."""
        n, oldest = self.db.execute(
            "SELECT count(*), min(received_ns) FROM events WHERE id > ? AND station = ''", (after_id,)
        ).fetchone()
        return int(n), oldest
