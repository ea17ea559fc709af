"""The store's labels of history by model version (``labels``) and the window counts the diversity report reads.
Methods of ``daemon.store.db.Store``, kept in their own module.

A new serving version labels the stored history again (``daemon.serve.relabel``): ``labels`` holds its cluster for
every event another version served, so that an event's cluster under version V is its output's when V served it,
else its ``labels`` row for V. The counts are SQL ``GROUP BY`` over integer window keys made from ``t0_ns``, so that
ten million events are summarised without a Python loop over them.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

HOUR_NS = 3_600 * 10**9
DAY_NS = 24 * HOUR_NS
# by → (window width, offset) in ns: key = floor((t0_ns + offset) / width); the Unix epoch was a Thursday, so
# ISO weeks (from Monday 00:00 UTC) start 3 days before a multiple of 7 days
WINDOWS: dict[str, tuple[int, int]] = {
    "hour": (HOUR_NS, 0),
    "day": (DAY_NS, 0),
    "week": (7 * DAY_NS, 3 * DAY_NS),
}


@dataclass(frozen=True)
class Todo:
    """Events another version served, above the re-labelling watermark, with their features."""

    ids: np.ndarray  # (events,) int64
    x: np.ndarray  # (events, n_features) float32; zeros where not ``ok``
    ok: np.ndarray  # (events,) bool: the features have the model's ``n_features`` values


def window_key(by: str) -> str:
    """The SQL expression of an event's window number (``e.t0_ns``); floor division, also for times before 1970."""
    if by not in WINDOWS:
        return "0"
    width, offset = WINDOWS[by]
    t = f"(e.t0_ns + {offset})"
    return f"({t} / {width} - ({t} % {width} < 0))"


def window_filter(
    station: str | None, sensor: str | None, since_ns: int | None, until_ns: int | None
) -> tuple[str, list[object]]:
    """A ``WHERE`` clause on ``events e`` (always true when nothing is asked) and its parameters."""
    parts: list[str] = ["1"]
    args: list[object] = []
    for clause, value in (
        ("e.station = ?", station),
        ("e.sensor = ?", sensor),
        ("e.t0_ns >= ?", since_ns),
        ("e.t0_ns < ?", until_ns),
    ):
        if value is not None:
            parts.append(clause)
            args.append(value)
    return " AND ".join(parts), args


class LabelTables:
    """Mixed into ``Store``: its connection and transaction helper are the store's."""

    db: sqlite3.Connection

    def _tx(self) -> AbstractContextManager[None]:
        raise NotImplementedError  # Store's

    # ---- re-labelling (daemon.serve.relabel) ----------------------------------------------------------------
    def serving_version(self) -> int | None:
        row = self.db.execute("SELECT max(version) FROM models WHERE status = 'serving'").fetchone()
        return None if row[0] is None else int(row[0])

    def relabelled_to(self, version: int) -> int:
        """The watermark: the highest event ID ``version`` has labelled in ``labels`` (0 = none)."""
        q = "SELECT coalesce(max(event_id), 0) FROM labels WHERE version = ?"
        return int(self.db.execute(q, (version,)).fetchone()[0])

    def relabel_todo(self, version: int, after_id: int, limit: int, n_features: int) -> Todo:
        """Up to ``limit`` events above ``after_id`` whose output another version made, oldest first."""
        rows = self.db.execute(
            "SELECT f.event_id, f.data FROM outputs o JOIN features f ON f.event_id = o.event_id"
            " WHERE o.event_id > ? AND o.model_version != ? ORDER BY o.event_id LIMIT ?",
            (after_id, version, limit),
        ).fetchall()
        x = np.zeros((len(rows), n_features), np.float32)
        ok = np.zeros(len(rows), dtype=bool)
        for i, (_, data) in enumerate(rows):
            if len(data) == 4 * n_features:
                x[i], ok[i] = np.frombuffer(data, np.float32), True
        return Todo(np.array([r[0] for r in rows], np.int64), x, ok)

    def add_labels(self, version: int, event_ids: np.ndarray, clusters: np.ndarray) -> None:
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO labels VALUES (?, ?, ?)",
                zip([version] * len(event_ids), event_ids.tolist(), clusters.tolist(), strict=True),
            )

    def _other_versions(self, version: int) -> list[int]:
        return [v for (v,) in self.db.execute("SELECT version FROM models WHERE version != ?", (version,))]

    def relabel_needed(self, version: int) -> bool:
        """Whether another version served an event above ``version``'s watermark: one index seek per recorded
        version (the serving loop asks at each swap)."""
        after = self.relabelled_to(version)
        q = "SELECT 1 FROM outputs INDEXED BY outputs_by_version WHERE model_version = ? AND event_id > ? LIMIT 1"
        return any(self.db.execute(q, (v, after)).fetchone() for v in self._other_versions(version))

    def relabel_left(self, version: int) -> int:
        """Events another version served that ``version`` has not labelled yet (counted in the covering index)."""
        after = self.relabelled_to(version)
        q = "SELECT count(*) FROM outputs INDEXED BY outputs_by_version WHERE model_version = ? AND event_id > ?"
        return sum(int(self.db.execute(q, (v, after)).fetchone()[0]) for v in self._other_versions(version))

    def prune_labels(self, keep: int, chunk: int = 20_000) -> int:
        """Drop other versions' labels, ``chunk`` rows a transaction (short ones: the serving loop writes too);
        return the rows dropped."""
        dropped = 0
        while True:
            with self._tx():
                n = self.db.execute(
                    "DELETE FROM labels WHERE (version, event_id) IN"
                    " (SELECT version, event_id FROM labels WHERE version != ? LIMIT ?)",
                    (keep, chunk),
                ).rowcount
            dropped += n
            if n < chunk:
                return dropped

    # ---- window counts (daemon.report.windows) --------------------------------------------------------------
    def window_totals(self, by: str, where: str, args: list[object]) -> list[tuple[str, int, int, int, int]]:
        """(station, window, events, first t0_ns, last t0_ns) of every window with events. The table itself is
        scanned: the planner's choice, the (station, sensor, seq) index, looks every row's time up again."""
        q = (
            f"SELECT e.station, {window_key(by)} AS w, count(*), min(e.t0_ns), max(e.t0_ns) FROM events e NOT INDEXED"
            f" WHERE {where} GROUP BY 1, w"
        )
        return self.db.execute(q, args).fetchall()

    def window_counts(self, by: str, version: int, where: str, args: list[object]) -> list[tuple[str, int, int, int]]:
        """(station, window, cluster, events) under ``version``: its outputs, and its labels of what others served."""
        q = (
            f"SELECT e.station, {window_key(by)} AS w, lab.cluster, count(*) FROM"
            " (SELECT event_id, cluster FROM outputs WHERE model_version = ?"
            "  UNION ALL SELECT event_id, cluster FROM labels WHERE version = ?) AS lab"
            f" JOIN events e ON e.id = lab.event_id WHERE {where} GROUP BY 1, w, lab.cluster"
        )
        return self.db.execute(q, [version, version, *args]).fetchall()

    def window_counts_served(self, by: str, where: str, args: list[object]) -> list[tuple[str, int, int, int, int]]:
        """(station, window, serving version, cluster, events) as published: the covering index of the outputs
        in event order, then each event's row (the planner would rather look up the outputs' wide rows)."""
        q = (
            f"SELECT e.station, {window_key(by)} AS w, o.model_version, o.cluster, count(*)"
            " FROM outputs o INDEXED BY outputs_by_version CROSS JOIN events e ON e.id = o.event_id"
            f" WHERE {where} GROUP BY 1, w, 3, 4"
        )
        return self.db.execute(q, args).fetchall()
