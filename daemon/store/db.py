"""The durable store (DESIGN §7): one SQLite file in WAL mode. A thin shell: SQL in, rows out.

Tables: ``events`` (one row per accepted recording, unique by station, sensor and seq), ``raw`` (samples, own table,
pruned by retention), ``features`` (written in the same transaction as the event, so raw samples are never
dropped before they are featurised), ``outputs`` (one per event, in event order), ``models``, ``quarantine``.
Acks are sent only after ``commit`` returns; ``synchronous=FULL`` makes a committed batch survive power loss.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.protocol import Event, Output, Quarantined
from daemon.store.labels import LabelTables
from daemon.store.models import ModelTables
from daemon.store.network import NetworkTables
from daemon.store.retention import drop_raw, raw_cutoff
from daemon.store.rows import REFUSED, each_in_savepoint, insert_event, insert_quarantine_rows, output_row, refused_row
from daemon.store.schema import DB_NAME, MIGRATIONS, SCHEMA, SCHEMA_VERSION, Checkpointer, wal_backstop, writer_settings

__all__ = ["DB_NAME", "MIGRATIONS", "REFUSED", "SCHEMA_VERSION", "Pending", "Store", "StoreError"]

INSERT_OUTPUT = (
    "INSERT OR IGNORE INTO outputs (event_id, model_version, cluster, probability, novelty, rec_error, latent)"
    " VALUES (?,?,?,?,?,?,?)"
)
MARK_PUBLISHED = "UPDATE outputs SET published = 1 WHERE event_id = ?"


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class Pending:
    """Stored events without an output, oldest first: what an output needs of them, and their features."""

    events: list[tuple[int, str, int, int]]  # (event ID, sensor, seq, t0_ns)
    x: np.ndarray  # (events, n_features) float32; zeros where not ``ok``
    ok: np.ndarray  # (events,) bool: the features have the model's ``n_features`` values


class Store(ModelTables, NetworkTables, LabelTables):
    def __init__(
        self,
        state_dir: Path,
        *,
        readonly: bool = False,
        timeout_s: float = 30.0,
        checkpoint_every_s: float | None = None,
    ) -> None:
        """``checkpoint_every_s``: checkpoint the WAL from a thread of its own this often (the serving loop);
        SQLite's automatic checkpoint then only runs as a backstop, when the WAL passes 64 MB."""
        self.path = Path(state_dir) / DB_NAME
        self.readonly = readonly
        self.migrated: tuple[int, Path] | None = None  # (old schema version, backup) when opening migrated it
        # Why the last write transaction failed ("" = it committed) and SQLite's name for it (SQLITE_BUSY,
        # SQLITE_FULL, …): the serving loop's watchdog reads them.
        self.write_error = ""
        self.write_error_name = ""
        if readonly:
            if not self.path.exists():
                raise StoreError(f"no store at {self.path}")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            writer_settings(self.db)
            self._migrate()
        self.db.execute("PRAGMA foreign_keys=OFF")
        self._raw_bytes: int | None = None
        self.dropped_raw = 0  # raw rows the last ``ingest`` dropped (``drop_raw``)
        self.checkpointer: Checkpointer | None = None
        if checkpoint_every_s is not None and not readonly:
            wal_backstop(self.db)
            self.checkpointer = Checkpointer(self.path, checkpoint_every_s)
            self.checkpointer.start()

    # ---- schema -------------------------------------------------------------------------------------------
    def _migrate(self) -> None:
        has_meta = self.db.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone()
        version = None
        if has_meta:
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else None
        if version is None:
            self.db.executescript("BEGIN;" + SCHEMA + "COMMIT;")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            return
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {version}; this Wingbeat knows up to {SCHEMA_VERSION}")
        if version < SCHEMA_VERSION:
            backup = self.path.with_name(f"{self.path.name}.v{version}.bak")
            if backup.exists():  # from an earlier attempt: keep it, and this copy too
                backup = backup.with_name(f"{backup.name}.{time.time_ns()}")
            self.db.execute("VACUUM INTO ?", (str(backup),))
            self.migrated = (version, backup)
            with self._tx():
                for v in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[v]:
                        self.db.execute(statement)
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def schema_version(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            self.db.execute("BEGIN IMMEDIATE")  # waits up to the busy timeout for another writer
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            self.write_error, self.write_error_name = str(e), getattr(e, "sqlite_errorname", "") or "SQLITE_ERROR"
            raise
        self.write_error = self.write_error_name = ""

    # ---- ingest -------------------------------------------------------------------------------------------
    def ingest(
        self,
        events: list[Event],
        features: list[np.ndarray],
        rejects: list[Quarantined],
        keep_raw: bool,
        outputs: list[Output] | None = None,
        mark_published: list[int] | None = None,
        drop_raw: tuple[int, int, int] = (0, 0, 0),
    ) -> list[int]:
        """Store a batch of new events with their features (channels, bins) and rejected messages in one
        transaction, and drop the raw samples ``drop_raw`` (from ``raw_cutoff``) in it: retention rides with the
        batch's commit, ``dropped_raw`` says how many rows went; return event IDs. Events whose (sensor,
        seq) is stored already are skipped (ID -1). ``outputs`` (one per event, ``event_id`` ignored) are stored
        with the events they belong to, and
        ``mark_published`` outputs are marked, in the same transaction: one commit per batch when the loop is
        caught up. Raises on disk errors (``sqlite3.OperationalError``), having rolled back: nothing of the batch
        is stored, so nothing of it may be acked. Any other error is one event's: the batch is stored again event
        by event, and an event the store cannot hold is quarantined (reason ``store``) with the ID ``REFUSED``,
        to be acked as rejected."""
        try:
            return self._ingest(events, features, rejects, keep_raw, outputs, mark_published, drop_raw)
        except sqlite3.OperationalError:
            raise
        except Exception:  # rolled back; found below, event by event
            return self._ingest(events, features, rejects, keep_raw, outputs, mark_published, drop_raw, True)

    def _ingest(
        self,
        events: list[Event],
        features: list[np.ndarray],
        rejects: list[Quarantined],
        keep_raw: bool,
        outputs: list[Output] | None,
        mark_published: list[int] | None,
        due: tuple[int, int, int],
        one_by_one: bool = False,
    ) -> list[int]:
        now = time.time_ns()
        self.dropped_raw = 0
        ids: list[int] = []
        feature_rows: list[tuple[int, bytes]] = []
        raw: list[tuple[int, bytes]] = []
        out_rows: list[tuple[Any, ...]] = []
        added = 0

        def insert(k: int) -> int:
            nonlocal added
            e = events[k]
            eid = insert_event(self.db, "", e, int(e.samples.shape[-1]), now)
            if eid < 0:
                return -1
            feature_rows.append((eid, np.ascontiguousarray(features[k], np.float32).tobytes()))
            samples = e.samples.tobytes() if keep_raw else b""
            raw.extend([(eid, samples)] if keep_raw else [])
            out_rows.extend([output_row(outputs[k], eid)] if outputs is not None else [])
            if one_by_one:  # this event's rows now, so that a failure rolls back with its savepoint
                self._flush(feature_rows, raw, out_rows)
            added += len(samples)
            return eid

        with self._tx():
            if one_by_one:
                ids = each_in_savepoint(self.db, len(events), insert, lambda k, err: refused_row(events[k], now, err))
            else:
                ids = [insert(k) for k in range(len(events))]
            self._flush(feature_rows, raw, out_rows)
            self.db.executemany(MARK_PUBLISHED, [(i,) for i in mark_published or []])
            insert_quarantine_rows(self.db, [(now, *q) for q in rejects])
            if due[0]:
                self.dropped_raw = drop_raw(self.db, due[0])
        if self._raw_bytes is not None:
            self._raw_bytes += added - (due[2] if due[0] else 0)
        return ids

    def _flush(self, features: list[Any], raw: list[Any], outputs: list[Any]) -> None:
        try:
            self.db.executemany("INSERT INTO features VALUES (?, ?)", features)
            self.db.executemany("INSERT INTO raw VALUES (?, ?)", raw)
            self.db.executemany(INSERT_OUTPUT, outputs)
        finally:
            del features[:], raw[:], outputs[:]

    # ---- outputs ------------------------------------------------------------------------------------------
    def last_output_id(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(event_id), 0) FROM outputs").fetchone()[0])

    def pending(self, limit: int, n_features: int) -> Pending:
        """Up to ``limit`` stored events without an output, oldest first, with their features; those without
        ``n_features`` values (another channel count than the model's) are not ``ok``."""
        rows = self.db.execute(
            "SELECT f.event_id, e.sensor, e.seq, e.t0_ns, f.data FROM features f JOIN events e ON e.id = f.event_id"
            " WHERE f.event_id > ? ORDER BY f.event_id LIMIT ?",
            (self.last_output_id(), limit),
        ).fetchall()
        x = np.zeros((len(rows), n_features), np.float32)
        ok = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            v = np.frombuffer(r[4], np.float32)
            if v.size == n_features:
                x[i], ok[i] = v, True
        return Pending([(r[0], r[1], r[2], r[3]) for r in rows], x, ok)

    def add_outputs(self, outputs: list[Output], mark_published: list[int] | None = None) -> None:
        """Store outputs and, in the same transaction, mark earlier ones as published."""
        with self._tx():
            self.db.executemany(INSERT_OUTPUT, [output_row(o, o.event_id) for o in outputs])
            self.db.executemany(MARK_PUBLISHED, [(i,) for i in mark_published or []])

    def unpublished(self, limit: int, after_id: int = 0) -> list[Output]:
        """Outputs not yet marked published, oldest first, with event IDs above ``after_id``."""
        rows = self.db.execute(
            "SELECT o.event_id, e.sensor, e.seq, e.t0_ns, o.model_version, o.cluster, o.probability, o.novelty,"
            " o.rec_error, o.latent FROM outputs o JOIN events e ON e.id = o.event_id WHERE o.published = 0"
            " AND o.event_id > ? ORDER BY o.event_id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [Output(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], tuple(json.loads(r[9]))) for r in rows]

    def mark_published(self, event_ids: list[int]) -> None:
        if event_ids:
            self.add_outputs([], mark_published=event_ids)

    # ---- training data ------------------------------------------------------------------------------------
    def count_events(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM events").fetchone()[0])

    def last_seqs(self) -> dict[str, int]:
        """The highest stored seq of each of this daemon's own sensors."""
        q = "SELECT sensor, max(seq) FROM events WHERE station = '' GROUP BY sensor"
        return dict(self.db.execute(q).fetchall())

    def max_event_id(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def training_set(self, limit: int, recent: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(event IDs, features (events, n), labels) of up to ``limit`` events: the newest ``recent`` of them and
        an even sample of the older ones (all of them when they fit)."""
        total = self.max_event_id()
        rows = self.db.execute(
            "SELECT f.event_id, f.data, e.label FROM features f JOIN events e ON e.id = f.event_id"
            " WHERE f.event_id > ? ORDER BY f.event_id",
            (max(0, total - (recent or limit)),),
        ).fetchall()
        rows = rows[-limit:]
        if len(rows) < limit:
            older = self.db.execute(
                "SELECT f.event_id, f.data, e.label FROM features f JOIN events e ON e.id = f.event_id"
                " WHERE f.event_id <= ? ORDER BY f.event_id",
                (max(0, total - (recent or limit)),),
            ).fetchall()
            room = limit - len(rows)
            if len(older) > room:
                pick = np.linspace(0, len(older) - 1, room).round().astype(int)
                older = [older[i] for i in pick]
            rows = older + rows
        if not rows:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32), np.empty(0, str)
        sizes = np.array([len(r[1]) for r in rows])
        values, counts = np.unique(sizes, return_counts=True)
        rows = [r for r, n in zip(rows, sizes, strict=True) if n == values[np.argmax(counts)]]  # one channel count
        x = np.stack([np.frombuffer(r[1], np.float32) for r in rows])
        ok = np.isfinite(x).all(axis=1)  # one NaN vector (a store written before the checks) would poison training
        return np.array([r[0] for r in rows], np.int64)[ok], x[ok], np.array([r[2] for r in rows])[ok]

    def outputs_for(self, event_ids: np.ndarray) -> np.ndarray:
        """Stored cluster of each event (NOVEL = -1 where an event has no output)."""
        out = np.full(len(event_ids), -1, np.int64)
        index = {int(e): i for i, e in enumerate(event_ids)}
        for chunk in range(0, len(event_ids), 900):
            ids = [int(e) for e in event_ids[chunk : chunk + 900]]
            q = f"SELECT event_id, cluster FROM outputs WHERE event_id IN ({','.join('?' * len(ids))})"
            for eid, cluster in self.db.execute(q, ids):
                out[index[eid]] = cluster
        return out

    # ---- retention ----------------------------------------------------------------------------------------
    def raw_bytes(self) -> int:
        """Bytes of raw samples kept: summed once, then kept up to date by ``ingest`` and ``prune_raw``."""
        if self._raw_bytes is None:
            self._raw_bytes = int(self.db.execute("SELECT coalesce(sum(length(samples)), 0) FROM raw").fetchone()[0])
        return self._raw_bytes

    def prune_raw(self, max_age_s: float | None, max_bytes: int | None, limit: int | None = None) -> int:
        """Drop raw samples older than ``max_age_s`` and then the oldest until under ``max_bytes``, at most ``limit``
        rows (the oldest) in a transaction of its own; return rows dropped (``daemon.store.retention``)."""
        due = self.raw_cutoff(max_age_s, max_bytes, limit)
        if not due[0]:
            return 0
        with self._tx():
            dropped = drop_raw(self.db, due[0])
        self._raw_bytes = self.raw_bytes() - due[2]
        return dropped

    def raw_cutoff(
        self, max_age_s: float | None, max_bytes: int | None, limit: int | None = None
    ) -> tuple[int, int, int]:
        """Raw samples due to go (``retention.raw_cutoff``): (newest event ID, rows, bytes); (0, 0, 0): none."""
        return raw_cutoff(self.db, self.raw_bytes(), max_age_s, max_bytes, limit, self.max_event_id)

    def file_bytes(self) -> int:
        """Bytes of the database and its write-ahead log."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.exists())

    def quarantine_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0])

    def prune_quarantine(self, keep: int) -> int:
        with self._tx():
            return self.db.execute(
                "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?", (keep,)
            ).rowcount

    # ---- reporting ----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        q = self.db.execute
        return {
            "events": int(q("SELECT count(*) FROM events").fetchone()[0]),
            "outputs": int(q("SELECT count(*) FROM outputs").fetchone()[0]),
            "unpublished": int(q("SELECT count(*) FROM outputs WHERE published = 0").fetchone()[0]),
            "raw_kept": int(q("SELECT count(*) FROM raw").fetchone()[0]),
            "per_sensor": dict(
                q(
                    "SELECT CASE station WHEN '' THEN sensor ELSE station || '/' || sensor END AS s, count(*)"
                    " FROM events GROUP BY s ORDER BY s"
                ).fetchall()
            ),
            "per_station": dict(q("SELECT station, count(*) FROM events GROUP BY station ORDER BY station").fetchall()),
            "per_cluster": {
                str(k): v for k, v in q("SELECT cluster, count(*) FROM outputs GROUP BY cluster ORDER BY cluster")
            },
            "quarantine": dict(q("SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason").fetchall()),
            "labelled": int(q("SELECT count(*) FROM events WHERE label != ''").fetchone()[0]),
            "schema_version": self.schema_version(),
            "bytes": self.path.stat().st_size if self.path.exists() else 0,
        }

    def export_rows(self, since_ns: int = 0) -> Iterator[tuple[Any, ...]]:
        yield from self.db.execute(
            "SELECT e.id, e.sensor, e.seq, e.t0_ns, e.fs, e.channels, e.n_samples, e.label, e.station, e.received_ns,"
            " o.model_version, o.cluster, o.probability, o.novelty, o.rec_error, o.latent"
            " FROM events e JOIN outputs o ON o.event_id = e.id WHERE e.t0_ns >= ? ORDER BY e.id",
            (since_ns,),
        )

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.stop()
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a small WAL behind
        self.db.close()
