"""The store's labels of history by model version (``labels``) and the window counts the diversity report reads.
Methods of ``daemon.store.db.Store``, kept in their own module.

A new serving version labels the stored history again (``daemon.serve.relabel``): ``labels`` holds its cluster for
every event another version served, so that an event's cluster under version V is its output's when V served it,
else its ``labels`` row for V. The window counts are made by SQLite without a Python loop over the events, and
without ``GROUP BY``, which sorts every event's row first (two thirds of the time on ten million events): each row's
(station, window, …, cluster) is packed into one integer key (``Key``) and counted into a temporary table of one
row per key (an UPSERT: one seek a row in a table of windows × clusters rows), so that the counting costs about
what reading the rows does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

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
CLUSTERS = (-(1 << 31), 32)  # a cluster's field in a key (lowest value, bits); the counts are GROUP BY beyond
WINDOW_BITS = 23  # any window number fits in 23 bits from −2**22: |t0_ns| < 2**63 ns, and 2**63 ns < 2**22 hours
KEY_BITS = 62  # a packed key, with room to spare below 2**63 (SQLite's integers; more would turn it into a REAL)


@dataclass(frozen=True)
class Todo:
    """Events another version served, above the re-labelling watermark, with their features."""

    ids: np.ndarray  # (events,) int64
    x: np.ndarray  # (events, n_features) float32; zeros where not ``ok``
    ok: np.ndarray  # (events,) bool: the features have the model's ``n_features`` values


@dataclass
class Key:
    """One integer of a row's (station, window, *fields) (``LabelTables._key``), the first field in the highest
    bits, each field ``value − lowest`` in its bits; −1 when a field is out of its range."""

    stations: list[str]  # the station field's values, in SQLite's order of names (the station is their index)
    fields: list[tuple[int, int]]  # (lowest value, bits) of station, window and the others
    args: list[object] = field(default_factory=list)  # the parameters of ``sql`` (the station names)
    sql: str = ""

    def unpack(self, key: int) -> tuple[Any, ...]:
        values: list[Any] = []
        for low, bits in reversed(self.fields):
            values.append((key & ((1 << bits) - 1)) + low)
            key >>= bits
        values.reverse()
        return (self.stations[values[0]], *values[1:])


def _station_tree(stations: list[str], lo: int, hi: int, args: list[object]) -> str:
    """The SQL of ``e.station``'s index in ``stations[lo:hi]`` (a binary search: a centre's many stations cost a
    few comparisons a row); NULL when it is none of them. Appends its parameters to ``args``, in the SQL's order."""
    if hi - lo == 1:
        args.append(stations[lo])
        return f"(CASE WHEN e.station = ? THEN {lo} END)"
    mid = (lo + hi) // 2
    args.append(stations[mid])
    below = _station_tree(stations, lo, mid, args)
    return f"(CASE WHEN e.station < ? THEN {below} ELSE {_station_tree(stations, mid, hi, args)} END)"


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
        src = f" FROM events e NOT INDEXED WHERE {where}"
        with self._snapshot():
            key = self._key(by, [])
            rows = None if key is None else self._count(key, f"SELECT {key.sql}, 1, e.t0_ns, e.t0_ns{src}", args, True)
            if rows is not None:
                return [(s, w, n, lo, hi) for (s, w), n, lo, hi in rows]
            q = f"SELECT e.station, {window_key(by)} AS w, count(*), min(e.t0_ns), max(e.t0_ns){src} GROUP BY 1, w"
            return self.db.execute(q, args).fetchall()

    def window_counts(self, by: str, version: int, where: str, args: list[object]) -> list[tuple[str, int, int, int]]:
        """(station, window, cluster, events) under ``version``: its outputs, and its labels of what others served."""
        src = (
            " FROM (SELECT event_id, cluster FROM outputs WHERE model_version = ?"
            "  UNION ALL SELECT event_id, cluster FROM labels WHERE version = ?) AS lab"
            f" JOIN events e ON e.id = lab.event_id WHERE {where}"
        )
        with self._snapshot():
            key = self._key(by, [("lab.cluster", CLUSTERS)])
            rows = None if key is None else self._count(key, f"SELECT {key.sql}, 1{src}", [version, version, *args])
            if rows is not None:
                return [(s, w, c, n) for (s, w, c), n in rows]
            q = f"SELECT e.station, {window_key(by)} AS w, lab.cluster, count(*){src} GROUP BY 1, w, lab.cluster"
            return self.db.execute(q, [version, version, *args]).fetchall()

    def window_counts_served(self, by: str, where: str, args: list[object]) -> list[tuple[str, int, int, int, int]]:
        """(station, window, serving version, cluster, events) as published: the covering index of the outputs
        in event order, then each event's row (the planner would rather look up the outputs' wide rows)."""
        src = f" FROM outputs o INDEXED BY outputs_by_version CROSS JOIN events e ON e.id = o.event_id WHERE {where}"
        with self._snapshot():
            # the versions' range: two seeks in the index
            low = self.db.execute("SELECT min(model_version) FROM outputs").fetchone()[0] or 0
            high = self.db.execute("SELECT max(model_version) FROM outputs").fetchone()[0] or 0
            key = self._key(by, [("o.model_version", (low, (high - low).bit_length())), ("o.cluster", CLUSTERS)])
            rows = None if key is None else self._count(key, f"SELECT {key.sql}, 1{src}", args)
            if rows is not None:
                return [(s, w, v, c, n) for (s, w, v, c), n in rows]
            q = f"SELECT e.station, {window_key(by)}, o.model_version, o.cluster, count(*){src} GROUP BY 1, 2, 3, 4"
            return self.db.execute(q, args).fetchall()

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction (a savepoint: also inside a caller's), so that the stations and versions a key is
        made of are those of the rows it counts."""
        self.db.execute("SAVEPOINT window_counts")
        try:
            yield
        finally:
            self.db.execute("RELEASE window_counts")

    def _stations(self) -> list[str]:
        """Every station with events, in SQLite's order: one seek each in the (station, sensor, seq) index."""
        out: list[str] = []
        row = self.db.execute("SELECT min(station) FROM events").fetchone()
        while row[0] is not None:
            out.append(row[0])
            row = self.db.execute("SELECT min(station) FROM events WHERE station > ?", (row[0],)).fetchone()
        return out

    def _key(self, by: str, fields: list[tuple[str, tuple[int, int]]]) -> Key | None:
        """The key of (station, window, *``fields``): each an SQL expression and its (lowest value, bits). None
        when there are no events or the fields do not fit in ``KEY_BITS`` (then the counts are ``GROUP BY``)."""
        stations = self._stations()
        if not stations:
            return None
        width = WINDOW_BITS if by in WINDOWS else 0
        key = Key(stations, [(0, (len(stations) - 1).bit_length()), (-(1 << width >> 1), width)])
        station = _station_tree(stations, 0, len(stations), key.args)
        sql = f"{station} * {1 << width} + {window_key(by)} + {1 << width >> 1}"
        checks = ["1"]
        for expr, (low, bits) in fields:
            if sum(b for _, b in key.fields) + bits > KEY_BITS:
                return None
            key.fields.append((low, bits))
            sql = f"({sql}) * {1 << bits} + {expr} - ({low})"
            checks.append(f"{expr} BETWEEN {low} AND {low + (1 << bits) - 1}")
        key.sql = f"coalesce(CASE WHEN {' AND '.join(checks)} THEN {sql} END, -1)"
        return key

    def _count(self, key: Key, select: str, args: list[object], times: bool = False) -> list[tuple[Any, ...]] | None:
        """The rows of ``select`` (key, 1[, t0_ns, t0_ns with ``times``]) counted by key, in key order: (unpacked
        key, events[, first t0_ns, last t0_ns]); None when a value did not fit its field (key −1)."""
        cols, update = "n INTEGER NOT NULL", "n = n + 1"
        if times:
            cols += ", lo INTEGER NOT NULL, hi INTEGER NOT NULL"
            update += ", lo = min(lo, excluded.lo), hi = max(hi, excluded.hi)"
        self.db.execute("DROP TABLE IF EXISTS temp.window_keys")
        self.db.execute(f"CREATE TEMP TABLE window_keys (k INTEGER PRIMARY KEY, {cols})")
        try:
            upsert = f"INSERT INTO temp.window_keys {select} ON CONFLICT (k) DO UPDATE SET {update}"
            self.db.execute(upsert, [*key.args, *args])
            rows = self.db.execute("SELECT * FROM temp.window_keys ORDER BY k").fetchall()
        finally:
            self.db.execute("DROP TABLE temp.window_keys")
        if rows and rows[0][0] < 0:
            return None
        return [(key.unpack(k), *rest) for k, *rest in rows]
