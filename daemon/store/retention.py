"""Retention of raw samples: which rows are due to go, and dropping them inside the caller's transaction.

``Store.prune_raw`` drops them in a transaction of its own; the serving loop has them dropped with a batch's commit
(``Store.ingest(drop_raw=…)``), a bounded number at a time: freeing a row's overflow pages costs about a tenth
of a millisecond, so a store at its limit drops a few rows with each batch, not thousands in one stall, and with
no commit (and fsync) of its own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable


def raw_cutoff(
    db: sqlite3.Connection,
    total: int,
    max_age_s: float | None,
    max_bytes: int | None,
    limit: int | None,
    max_event_id: Callable[[], int],
) -> tuple[int, int, int]:
    """The raw samples due to go, oldest first: those older than ``max_age_s``, then the oldest until the ``total``
    bytes kept are at most ``max_bytes``, at most ``limit`` rows of them. (newest event ID of them, rows, bytes);
    (0, 0, 0) when none is due. One pass over the rows that go (their lengths come from the row headers)."""
    age_cut = 0
    if max_age_s is not None:
        cutoff = time.time_ns() - int(max_age_s * 1e9)
        oldest = int(db.execute("SELECT coalesce(min(event_id), 0) FROM raw").fetchone()[0])
        # IDs grow with arrival: the first young event from the oldest kept one on bounds what is too old
        young = db.execute(
            "SELECT id FROM events WHERE id >= ? AND received_ns >= ? ORDER BY id LIMIT 1", (oldest, cutoff)
        ).fetchone()
        age_cut = int(young[0]) - 1 if young else max_event_id()
    excess = total - max_bytes if max_bytes is not None else 0
    cut = rows = freed = 0
    if age_cut or excess > 0:
        for eid, size in db.execute("SELECT event_id, length(samples) FROM raw ORDER BY event_id"):
            if (eid > age_cut and freed >= excess) or (limit is not None and rows >= limit):
                break
            cut, rows, freed = eid, rows + 1, freed + size
    return cut, rows, freed


def drop_raw(db: sqlite3.Connection, cutoff_id: int) -> int:
    """Delete the raw samples of events up to ``cutoff_id`` (in the caller's transaction); rows deleted."""
    return int(db.execute("DELETE FROM raw WHERE event_id <= ?", (cutoff_id,)).rowcount)
