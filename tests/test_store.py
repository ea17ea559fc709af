import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from daemon.protocol import REFUSED, Event, Output, Quarantined
from daemon.store.db import DB_NAME, SCHEMA_VERSION, Store, StoreError
from daemon.store.schema import PAGE_SIZE


def ev(seq: int, sensor: str = "s1", label: str = "", n: int = 100) -> Event:
    return Event(sensor, seq, 1000 + seq, 20800.0, "int16", 2, np.full((2, n), seq, np.int16), label, {"k": seq})


def put(st: Store, events: list[Event], rejects: list[tuple], keep_raw: bool) -> list[int]:
    """Events with features (2 channels × 4 bins of seq / 10), as the serving loop stores them."""
    feats = [np.full((2, 4), e.seq / 10, np.float32) for e in events]
    return st.ingest(events, feats, [Quarantined(*r) for r in rejects], keep_raw=keep_raw)


def test_round_trip_and_dedup(tmp_path):
    st = Store(tmp_path)
    ids = put(st, [ev(0), ev(1)], [("json", "bad", None, None, b"xx", "ack")], keep_raw=True)
    assert ids == [1, 2]
    assert put(st, [ev(1), ev(2)], [], keep_raw=True) == [-1, 3]  # (s1, 1) is stored already
    p = st.pending(10, 8)
    assert p.events == [(1, "s1", 0, 1000), (2, "s1", 1, 1001), (3, "s1", 2, 1002)]
    assert p.ok.all() and p.x[2, 0] == pytest.approx(0.2)
    assert st.pending(10, 6).ok.tolist() == [False] * 3  # features of another size than the model's
    out = Output(1, "s1", 0, 1000, 1, 4, 0.9, 0.1, 0.5, (0.5, -0.5))
    st.add_outputs([out])
    assert [e[0] for e in st.pending(10, 8).events] == [2, 3]
    assert st.unpublished(10) == [out]  # the same record back, field for field
    st.mark_published([1])
    assert st.unpublished(10) == []
    s = st.summary()
    assert s["events"] == 3 and s["per_cluster"] == {"4": 1} and s["quarantine"] == {"json": 1}
    st.close()
    again = Store(tmp_path, readonly=True)  # everything committed survives a reopen
    assert again.count_events() == 3 and again.integrity_ok()


def test_a_failed_batch_stores_nothing(tmp_path):
    """A disk or locking error is the batch's: it raises, and nothing of the batch is stored (nor may be acked)."""
    st = Store(tmp_path)
    other = sqlite3.connect(tmp_path / DB_NAME)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
    st.db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(sqlite3.OperationalError):
        put(st, [ev(0), ev(1)], [], keep_raw=True)
    other.rollback()
    other.close()
    assert st.count_events() == 0


def test_an_event_the_store_refuses_is_quarantined_and_the_rest_of_its_batch_stored(tmp_path):
    """Any other error is one event's: that event is quarantined (reason ``store``), the others stored."""
    st = Store(tmp_path)
    # on the raw row of seq 1: its event and features, written before it, must go too
    boom = "WHEN (SELECT seq FROM events WHERE id = NEW.event_id) = 1 BEGIN SELECT RAISE(ABORT, 'x'); END"
    st.db.execute(f"CREATE TRIGGER boom BEFORE INSERT ON raw {boom}")
    ids = put(st, [ev(0), ev(1), ev(2)], [], keep_raw=True)
    assert ids[0] > 0 and ids[1] == REFUSED and ids[2] > 0
    assert st.count_events() == 2 and st.db.execute("SELECT count(*) FROM raw").fetchone()[0] == 2
    assert st.db.execute("SELECT count(*) FROM features").fetchone()[0] == 2
    assert st.db.execute("SELECT reason, seq FROM quarantine").fetchall() == [("store", 1)]


def test_retention_drops_oldest_raw_only(tmp_path):
    st = Store(tmp_path)
    put(st, [ev(i) for i in range(10)], [], keep_raw=True)
    per = 2 * 100 * 2
    assert st.raw_bytes() == 10 * per
    assert st.prune_raw(None, 4 * per) == 6
    kept = [r[0] for r in st.db.execute("SELECT event_id FROM raw ORDER BY event_id")]
    assert kept == [7, 8, 9, 10]
    assert st.db.execute("SELECT count(*) FROM features").fetchone()[0] == 10  # features are kept
    assert st.prune_raw(0.0, None) == 4  # older than 0 s: everything


def test_retention_in_steps_drops_the_oldest_first_and_reaches_the_limit(tmp_path):
    """The serving loop drops a bounded number of raw rows at a time (``limit``) until the store is under its
    limits: with each batch's own commit (twice the batch's events, at least ``PRUNE_MIN_ROWS``), and by steps of
    ``PRUNE_MIN_ROWS`` on turns that stored no batch."""
    from dataclasses import replace

    from daemon.ops.config import Config
    from daemon.ops.metrics import Metrics
    from daemon.serve.housekeeping import PRUNE_MIN_ROWS, Housekeeper

    st = Store(tmp_path)
    put(st, [ev(i) for i in range(10)], [], keep_raw=True)
    per = 2 * 100 * 2
    assert st.prune_raw(None, 4 * per, limit=2) == 2  # 6 are due; the 2 oldest go
    assert [r[0] for r in st.db.execute("SELECT event_id FROM raw ORDER BY event_id")] == list(range(3, 11))
    assert st.prune_raw(0.0, None, limit=3) == 3 and st.raw_bytes() == 5 * per
    assert st.prune_raw(None, 4 * per, limit=100) == 1 and st.raw_bytes() == 4 * per

    n = 3 * PRUNE_MIN_ROWS + 10  # more than three steps
    put(st, [ev(i) for i in range(10, 10 + n)], [], keep_raw=True)
    cfg = Config()
    cfg = replace(cfg, store=replace(cfg.store, raw_max_age_days=0.0, raw_max_bytes=10 * per))
    hk = Housekeeper(tmp_path, st, Metrics())
    hk.run(cfg)  # the round every few seconds: one step, more is due
    assert hk.prune_due and st.raw_bytes() == (4 + n - PRUNE_MIN_ROWS) * per
    hk.prune_turn()  # an idle turn: one more step
    assert hk.prune_due and st.raw_bytes() == (4 + n - 2 * PRUNE_MIN_ROWS) * per
    feats = [np.zeros((2, 4), np.float32)] * 40
    hk.ingest([ev(i) for i in range(10 + n, 50 + n)], feats, [], None, [])  # up to 80 rows may go with 40 events
    # the 68 rows due before the batch went with it; its own 40 took the store past the limit again
    assert st.dropped_raw == 68 and st.raw_bytes() == 50 * per and hk.prune_due
    hk.prune_turn()  # the batch carried retention this turn: no step of its own
    assert st.raw_bytes() == 50 * per
    while hk.prune_due:
        hk.prune_turn()
    assert st.raw_bytes() == 10 * per == st.db.execute("SELECT sum(length(samples)) FROM raw").fetchone()[0]
    kept = [r[0] for r in st.db.execute("SELECT event_id FROM raw ORDER BY event_id")]
    assert kept == list(range(41 + n, 51 + n))  # the newest ten (IDs 1 … 50 + n were stored)
    assert st.count_events() == 50 + n and st.db.execute("SELECT count(*) FROM features").fetchone()[0] == 50 + n
    hk.ingest([ev(i) for i in range(50 + n, 90 + n)], feats, [], None, [])  # none was due: none goes with it
    assert st.dropped_raw == 0 and st.raw_bytes() == 50 * per and hk.prune_due  # due now, for the next turn
    hk.prune_turn()
    assert st.raw_bytes() == 10 * per and not hk.prune_due


def test_training_set_mixes_recent_and_older(tmp_path):
    st = Store(tmp_path)
    put(st, [ev(i, label="a" if i % 2 else "") for i in range(100)], [], keep_raw=False)
    ids, x, labels = st.training_set(limit=30, recent=10)
    assert len(ids) == 30 and ids[-10:].tolist() == list(range(91, 101))
    assert ids[0] == 1 and np.all(np.diff(ids) > 0)
    assert x.shape == (30, 8) and set(labels) == {"a", ""}


def test_schema_version_and_refusal_of_newer(tmp_path):
    st = Store(tmp_path)
    assert st.schema_version() == SCHEMA_VERSION
    st.db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    st.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store(tmp_path)


def test_readonly_needs_a_store(tmp_path):
    with pytest.raises(StoreError, match="no store"):
        Store(tmp_path / "nothing", readonly=True)


V1 = Path(__file__).parent / "data" / "store-v1.sqlite"  # written by the schema-1 store: 30 events, 20 outputs


def test_a_schema_1_store_migrates_with_a_backup_and_loses_nothing(tmp_path):
    shutil.copy(V1, tmp_path / DB_NAME)
    st = Store(tmp_path)
    assert st.schema_version() == SCHEMA_VERSION == 4
    assert st.migrated is not None and st.migrated[0] == 1
    backup = st.migrated[1]
    assert backup.read_bytes()[:16] == b"SQLite format 3\0"
    old = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    assert old.execute("SELECT value FROM meta").fetchone() == ("1",)
    s = st.summary()
    assert s["events"] == 30 and s["outputs"] == 20 and s["quarantine"] == {"json": 1, "length": 1}
    assert [o.event_id for o in st.unpublished(100)] == [16, 17, 18, 19, 20]
    assert st.integrity_ok()
    q = st.db.execute("SELECT reason, endpoint FROM quarantine ORDER BY id").fetchall()
    assert q == [("json", ""), ("length", "")]  # rows from before the column say so
    # and the migrated store takes new input as usual, in the new shape
    assert put(st, [ev(100)], [("json", "bad", None, None, b"x", "plain")], keep_raw=True) == [31]
    assert st.db.execute("SELECT endpoint FROM quarantine ORDER BY id DESC").fetchone() == ("plain",)
    st.close()
    assert Store(tmp_path).migrated is None  # once


def test_a_failed_migration_leaves_the_old_store_as_it_was(tmp_path, monkeypatch):
    import daemon.store.db as store

    shutil.copy(V1, tmp_path / DB_NAME)
    monkeypatch.setitem(store.MIGRATIONS, 1, [*store.MIGRATIONS[1], "ALTER TABLE nothing ADD COLUMN x"])
    with pytest.raises(sqlite3.OperationalError, match="nothing"):
        Store(tmp_path)
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT value FROM meta").fetchone() == ("1",)
    assert "endpoint" not in [r[1] for r in db.execute("PRAGMA table_info(quarantine)")]
    assert db.execute("SELECT count(*) FROM events").fetchone() == (30,)


def test_checkpoint_thread_keeps_the_wal_small_and_leaves_it_empty(tmp_path):
    import time

    big = [ev(i, n=6_250) for i in range(400)]  # 10 MB of raw samples
    wal = tmp_path / f"{DB_NAME}-wal"
    st = Store(tmp_path, checkpoint_every_s=0.02)
    page = st.db.execute("PRAGMA page_size").fetchone()[0]
    assert page == PAGE_SIZE  # a new store's pages: an event's raw samples in two, not seven
    assert st.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] * page == 64 << 20  # the writer's own: a backstop
    sizes = []
    for i in range(0, 400, 20):
        put(st, big[i : i + 20], [], keep_raw=True)
        time.sleep(0.03)
        sizes.append(wal.stat().st_size)
    deadline = time.monotonic() + 10
    while st.checkpointer is not None and st.checkpointer.runs < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert st.checkpointer is not None and st.checkpointer.runs >= 5 and st.checkpointer.error == ""
    # without the thread the WAL would hold every batch until the 64 MB backstop: 10 MB here
    assert max(sizes) < 5_000_000, sizes
    st.close()
    assert not wal.exists() or wal.stat().st_size == 0
    ro = Store(tmp_path, readonly=True)
    assert ro.raw_bytes() == 400 * 25_000 and ro.integrity_ok()


def test_an_existing_store_keeps_its_page_size_and_its_backstop_in_bytes(tmp_path):
    shutil.copy(V1, tmp_path / DB_NAME)  # made with 4 KB pages
    st = Store(tmp_path, checkpoint_every_s=0.05)
    assert st.db.execute("PRAGMA page_size").fetchone()[0] == 4096 != PAGE_SIZE
    assert st.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (64 << 20) // 4096
    put(st, [ev(i, n=6_250) for i in range(100, 120)], [], keep_raw=True)
    assert st.count_events() == 50
    st.close()
