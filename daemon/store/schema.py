"""The store's schema (DESIGN §7), its migrations, and the WAL checkpoint thread. Tables: ``events`` (one row per
accepted recording, unique by station, sensor and seq; station '' for the daemon's own events, a station's name
for events pooled at the centre), ``raw`` (samples, own table, pruned by retention), ``features``
(written in the same transaction as the event), ``outputs`` (one per event, in event order), ``models``,
``quarantine``, ``labels`` (the serving version's clusters for events another version served: history re-labelled
in the background, ``daemon.serve.relabel``), and ``meta`` (schema version, how the features were made)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

SCHEMA_VERSION = 4
DB_NAME = "wingbeat.sqlite"
PAGE_SIZE = 16384  # bytes, for a new store: an event's 25 KB of raw samples fill 2 pages, not 7 of 4 KB

# Clusters by model version: ``labels`` holds what a version gave events that another version served (rows of the
# serving version, and of older ones until pruned); ``outputs_by_version`` covers (version, event, cluster), so that
# the window counts (``daemon.report.windows``) read neither table's rows. Both are appended to in event order.
LABELS = [
    "CREATE TABLE IF NOT EXISTS labels (version INTEGER NOT NULL, event_id INTEGER NOT NULL, cluster INTEGER NOT NULL,"
    " PRIMARY KEY (version, event_id)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS outputs_by_version ON outputs (model_version, event_id, cluster)",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    station TEXT NOT NULL DEFAULT '',
    sensor TEXT NOT NULL,
    seq INTEGER NOT NULL,
    t0_ns INTEGER NOT NULL,
    fs REAL NOT NULL,
    dtype TEXT NOT NULL,
    channels INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{}',
    received_ns INTEGER NOT NULL,
    UNIQUE (station, sensor, seq)
);
CREATE TABLE IF NOT EXISTS raw (event_id INTEGER PRIMARY KEY, samples BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS features (event_id INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (
    event_id INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    cluster INTEGER NOT NULL,
    probability REAL NOT NULL,
    novelty REAL NOT NULL,
    rec_error REAL NOT NULL,
    latent TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outputs_unpublished ON outputs (event_id) WHERE published = 0;
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    received_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    sensor TEXT,
    seq INTEGER,
    frames BLOB NOT NULL,
    endpoint TEXT NOT NULL DEFAULT ''
);
"""
SCHEMA += "".join(f"{statement};\n" for statement in LABELS)

# Migrations from version N to N + 1: statements applied in order, all versions in one transaction, after a
# backup copy of the database (``wingbeat.sqlite.vN.bak``). Statements, not a script: ``executescript`` commits.
MIGRATIONS: dict[int, list[str]] = {
    # 2: quarantine rows say which endpoint the message came on ("ack" = ROUTER, "plain" = PULL; '' before)
    1: ["ALTER TABLE quarantine ADD COLUMN endpoint TEXT NOT NULL DEFAULT ''"],
    # 3: events say which station they came from (the centre pools stations' events; '' = this daemon's own), and
    # are unique by (station, sensor, seq): two stations may have sensors of the same name. SQLite cannot change a
    # UNIQUE constraint in place, so the table is rebuilt with the same IDs.
    2: [
        "CREATE TABLE events_v3 (id INTEGER PRIMARY KEY, station TEXT NOT NULL DEFAULT '', sensor TEXT NOT NULL,"
        " seq INTEGER NOT NULL, t0_ns INTEGER NOT NULL, fs REAL NOT NULL, dtype TEXT NOT NULL,"
        " channels INTEGER NOT NULL, n_samples INTEGER NOT NULL, label TEXT NOT NULL DEFAULT '',"
        " meta TEXT NOT NULL DEFAULT '{}', received_ns INTEGER NOT NULL, UNIQUE (station, sensor, seq))",
        "INSERT INTO events_v3 (id, station, sensor, seq, t0_ns, fs, dtype, channels, n_samples, label, meta,"
        " received_ns) SELECT id, '', sensor, seq, t0_ns, fs, dtype, channels, n_samples, label, meta, received_ns"
        " FROM events",
        "DROP TABLE events",
        "ALTER TABLE events_v3 RENAME TO events",
    ],
    # 4: the serving version's labels of history (``labels``), and the published clusters by version in an index
    # that the window counts read without touching the outputs' latents
    3: [*LABELS],
}


def writer_settings(db: sqlite3.Connection) -> None:
    """The writer's connection: WAL, every commit durable (``synchronous=FULL``, DESIGN §7), and for a new store
    pages of ``PAGE_SIZE`` (a no-op on an existing one: it keeps its own)."""
    db.execute(f"PRAGMA page_size={PAGE_SIZE}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")


def wal_backstop(db: sqlite3.Connection, mib: int = 64) -> None:
    """SQLite's own checkpoint, inside a commit, only once the WAL passes ``mib`` MB (the ``Checkpointer`` runs
    long before)."""
    page = int(db.execute("PRAGMA page_size").fetchone()[0])
    db.execute(f"PRAGMA wal_autocheckpoint={(mib << 20) // page}")


class Checkpointer(threading.Thread):
    """Copies the WAL into the database file every ``every_s`` seconds on its own connection (``PASSIVE``: it
    never blocks the writer), so that the writer's commits do not stop for checkpoints. With 25 KB of raw
    samples per event the WAL grows by megabytes a second, and SQLite's automatic checkpoint (every 4 MB, run
    inside a commit, with an fsync of the database file) held up the serving loop for tens of milliseconds."""

    def __init__(self, path: Path, every_s: float) -> None:
        super().__init__(name="wal-checkpoint", daemon=True)
        self.path, self.every_s = path, every_s
        self.stopping = threading.Event()
        self.runs = 0
        self.error = ""  # the last failure ("" after a success); the next run tries again

    def run(self) -> None:
        db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None)
        try:
            while not self.stopping.wait(self.every_s):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.runs += 1
                    self.error = ""
                except sqlite3.Error as e:
                    self.error = str(e)
        finally:
            db.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
