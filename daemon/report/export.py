"""``wingbeat export``: the store's outputs with their events, as CSV, NumPy ``.npz`` or Parquet, for analysis in
pandas or R; and the shared pieces of the Darwin Core Archive (``daemon.report.dwca``): the time windows and the
sensor hours of each station. A thin shell: reads the store, writes files, each written to a temporary name and
renamed into place so that a reader never sees half a file."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.store.db import Store
from daemon.store.labels import HOUR_NS, WINDOWS

# One row per event with an output. ``station`` is '' for the daemon's own events and the station's name for
# events pooled at a centre; ``meta`` is the event's JSON object as it came on the wire.
COLUMNS = (
    "event_id",
    "sensor",
    "seq",
    "t0_ns",
    "fs",
    "channels",
    "n_samples",
    "label",
    "station",
    "received_ns",
    "model_version",
    "cluster",
    "probability",
    "novelty",
    "rec_error",
    "latent",
    "meta",
)
SELECT = (
    "SELECT e.id, e.sensor, e.seq, e.t0_ns, e.fs, e.channels, e.n_samples, e.label, e.station, e.received_ns,"
    " o.model_version, o.cluster, o.probability, o.novelty, o.rec_error, o.latent, e.meta"
    " FROM events e JOIN outputs o ON o.event_id = e.id"
)


@dataclass(frozen=True)
class Query:
    """Which events: ``since_ns`` ≤ t0 < ``until_ns`` (ns since the epoch, UTC), of one ``station`` or all (None;
    '' is the daemon's own events)."""

    since_ns: int = 0
    until_ns: int | None = None
    station: str | None = None

    def where(self, table: str = "e") -> tuple[str, list[Any]]:
        sql = f" WHERE {table}.t0_ns >= ?"
        args: list[Any] = [self.since_ns]
        if self.until_ns is not None:
            sql, args = sql + f" AND {table}.t0_ns < ?", [*args, self.until_ns]
        if self.station is not None:
            sql, args = sql + f" AND {table}.station = ?", [*args, self.station]
        return sql, args


def output_rows(store: Store, q: Query) -> Iterator[tuple[Any, ...]]:
    """Rows in ``COLUMNS`` order, oldest event first."""
    where, args = q.where()
    yield from store.db.execute(SELECT + where + " ORDER BY e.id", args)


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp{out.suffix}")


def write_csv(rows: list[tuple[Any, ...]], out: Path) -> None:
    tmp = _tmp(out)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    os.replace(tmp, out)


def _latents(rows: list[tuple[Any, ...]]) -> list[list[float]]:
    i = COLUMNS.index("latent")
    return [json.loads(r[i]) for r in rows]


def write_npz(rows: list[tuple[Any, ...]], out: Path) -> None:
    """One array per column; ``latent`` as (events, width) float64, NaN-padded where versions differ in width;
    ``meta`` as JSON strings (a Unicode array: no pickle)."""
    arrays = {c: np.array([r[i] for r in rows]) for i, c in enumerate(COLUMNS) if c != "latent"}
    if not rows:
        arrays = {c: np.array([]) for c in COLUMNS if c != "latent"}
    lat = _latents(rows)
    width = max((len(v) for v in lat), default=0)
    arrays["latent"] = np.array([v + [np.nan] * (width - len(v)) for v in lat], dtype=np.float64).reshape(
        len(lat), width
    )
    tmp = _tmp(out)
    np.savez_compressed(tmp, allow_pickle=False, **arrays)
    os.replace(tmp, out)


def write_parquet(rows: list[tuple[Any, ...]], out: Path) -> None:
    """Typed columns: integers as int64, rates and scores as float64, ``t0`` and ``received`` as timestamp[ns, UTC]
    (the store's ``t0_ns`` and ``received_ns``), text as strings (``meta``: the event's JSON) and ``latent`` as
    list<float32>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = {c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}
    ts = pa.timestamp("ns", tz="UTC")
    schema = pa.schema(
        [
            ("event_id", pa.int64()),
            ("station", pa.string()),
            ("sensor", pa.string()),
            ("seq", pa.int64()),
            ("t0", ts),
            ("received", ts),
            ("fs", pa.float64()),
            ("channels", pa.int64()),
            ("n_samples", pa.int64()),
            ("label", pa.string()),
            ("model_version", pa.int64()),
            ("cluster", pa.int64()),
            ("probability", pa.float64()),
            ("novelty", pa.float64()),
            ("rec_error", pa.float64()),
            ("latent", pa.list_(pa.float32())),
            ("meta", pa.string()),
        ]
    )
    renamed = {"t0": "t0_ns", "received": "received_ns"}
    data = {name: col[renamed.get(name, name)] for name in schema.names}
    data["latent"] = _latents(rows)
    table = pa.Table.from_pydict(data, schema=schema)
    tmp = _tmp(out)
    pq.write_table(table, tmp)
    os.replace(tmp, out)


def export_table(state: Path, out: Path, q: Query) -> int:
    """Write the outputs of ``q`` to ``out`` (.csv, .npz or .parquet); return how many."""
    writers = {".csv": write_csv, ".npz": write_npz, ".parquet": write_parquet}
    if out.suffix not in writers:
        raise ValueError(f"--out must end in .csv, .npz or .parquet (or .zip with --format dwca), got {out.name}")
    store = Store(state, readonly=True)
    try:
        rows = list(output_rows(store, q))
    finally:
        store.close()
    writers[out.suffix](rows, out)
    return len(rows)


# ---- windows: what the Darwin Core Archive and the report count per station and period ----------------------
def window_start(t_ns: int, by: str) -> int:
    """Start (ns since the epoch) of the UTC calendar hour, day or ISO week (from Monday 00:00) holding ``t_ns``:
    the windows of ``wingbeat diversity`` (``daemon.store.labels.WINDOWS``)."""
    if by not in WINDOWS:
        raise ValueError(f"--by must be one of {', '.join(WINDOWS)}, got {by!r}")
    width, offset = WINDOWS[by]
    return (t_ns + offset) // width * width - offset


def window_length(by: str) -> int:
    return WINDOWS[by][0]


@dataclass
class Window:
    """One station's events in one period: counts per (model version, cluster) and its sensor hours (for each
    sensor, the clock hours of the period in which it recorded at least one event, summed over the sensors: the
    effort the store can prove; a sensor that ran but caught nothing leaves no trace)."""

    station: str
    start_ns: int
    end_ns: int
    counts: Counter[tuple[int, int]] = field(default_factory=Counter)
    sensor_hours: int = 0
    sensors: set[str] = field(default_factory=set)

    @property
    def events(self) -> int:
        return sum(self.counts.values())


def count_windows(store: Store, q: Query, by: str) -> list[Window]:
    """Windows with at least one event, by station then start. Counts are of events with an output; sensor hours
    are of every stored event (recording went on whether or not a model had served yet)."""
    length = window_length(by)
    where, args = q.where()
    out: dict[tuple[str, int], Window] = {}

    def window(station: str, t0: int) -> Window:
        start = window_start(t0, by)
        key = (station, start)
        if key not in out:
            out[key] = Window(station, start, start + length)
        return out[key]

    hours: set[tuple[str, str, int]] = set()
    for station, sensor, hour in store.db.execute(
        f"SELECT DISTINCT e.station, e.sensor, e.t0_ns / {HOUR_NS} FROM events e" + where, args
    ):
        hours.add((station, sensor, int(hour)))
    for station, sensor, hour in hours:
        w = window(station, hour * HOUR_NS)
        w.sensor_hours += 1
        w.sensors.add(sensor)
    for station, t0, version, cluster in store.db.execute(
        "SELECT e.station, e.t0_ns, o.model_version, o.cluster FROM events e JOIN outputs o ON o.event_id = e.id"
        + where,
        args,
    ):
        window(station, int(t0)).counts[(int(version), int(cluster))] += 1
    return [out[k] for k in sorted(out)]


def version_cards(state: Path, version: int) -> list[dict[str, Any]]:
    """The cluster cards (``model.cards``) recorded in a model version's manifest; none when it has none."""
    try:
        manifest = json.loads((state / "models" / f"v{version}" / "manifest.json").read_text())
    except (OSError, ValueError):
        return []
    return list(manifest.get("cards", []))
