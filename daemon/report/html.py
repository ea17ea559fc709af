"""``wingbeat report``: one self-contained HTML page for a deployment, to open offline on a field laptop and send.

The page holds everything it shows: figures are inline SVG (``daemon.report.figures``), the style sheet is in the
page, there is no script, and a Content-Security-Policy of ``default-src 'none'`` tells the browser to fetch nothing
even if something slipped in. Every string that comes from the store (labels, sensor and station names, all sent
over the wire) is escaped.

Sections: summary; the serving model's cluster cards; abundance per day stacked by cluster; diel activity; Hill
numbers q = 0, 1, 2 per day with their 95 % intervals; the rarefaction / extrapolation curve of the whole period;
and, when the store holds several stations' events (a centre), the station × station dissimilarity."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from daemon.report import figures
from daemon.report.estimates import day_windows, rarefied, station_dissimilarity
from daemon.report.export import Query, version_cards
from daemon.store.db import Store
from daemon.store.labels import DAY_NS, HOUR_NS
from model.spectra import FeatureConfig

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1160px; padding: 0 20px 40px; color: #222; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin: 0 0 16px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; text-align: left; }
th { background: #f3f3f3; } tr:nth-child(even) td { background: #fafafa; } td.n { text-align: right; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(350px, 1fr)); gap: 14px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; }
.card h3 { margin: 4px 0; } .card table { width: 100%; table-layout: fixed; overflow-wrap: anywhere; }
.card th:first-child { width: 54%; } .card th { overflow-wrap: normal; } .card p { margin: 2px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; }
svg { max-width: 100%; height: auto; } .note { color: #666; font-size: 13px; }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


@dataclass
class Data:
    """What the page shows, read from the store once."""

    t0: np.ndarray  # (events,) int64 ns, events with an output
    cluster: np.ndarray  # (events,) int64 under ``version`` (see ``cluster_sql``), −1 = novel
    station: np.ndarray  # (events,) str
    versions: dict[int, int]  # model version → events it labelled
    stored: int  # events in the query, with or without an output
    sensors: list[str]
    labels: dict[int, dict[str, int]]  # cluster → labelled events by label, in the query
    version: int | None  # the model version whose clusters the page shows


def serving(store: Store) -> int | None:
    """The version that serves now; else the newest that labelled events (a store whose daemon stopped)."""
    row = store.db.execute("SELECT max(version) FROM models WHERE status = 'serving'").fetchone()
    if row[0] is None:
        row = store.db.execute("SELECT max(model_version) FROM outputs").fetchone()
    return None if row[0] is None else int(row[0])


def cluster_sql(store: Store, version: int | None) -> tuple[str, str, list[Any]]:
    """(an event's cluster under ``version``, the join that needs, its parameters): its output's cluster when
    ``version`` served it, else the cluster ``version`` gave it when history was re-labelled (``labels``), else
    (not re-labelled yet, or a store without that table) its output's cluster as served."""
    has_labels = store.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone()
    if version is None or not has_labels:
        return "o.cluster", "", []
    return (
        "CASE WHEN o.model_version = ? THEN o.cluster ELSE coalesce(l.cluster, o.cluster) END",
        " LEFT JOIN labels l ON l.event_id = e.id AND l.version = ?",
        [version, version],
    )


def read(store: Store, q: Query) -> Data:
    where, args = q.where()
    version = serving(store)
    cluster_of, join, cargs = cluster_sql(store, version)
    base = f" FROM events e JOIN outputs o ON o.event_id = e.id{join}{where}"
    query = f"SELECT e.t0_ns, {cluster_of}, e.station, o.model_version{base} ORDER BY e.id"
    rows = store.db.execute(query, cargs + args).fetchall()
    t0 = np.array([r[0] for r in rows], np.int64)
    cluster = np.array([r[1] for r in rows], np.int64)
    station = np.array([r[2] for r in rows], dtype=str)
    versions: dict[int, int] = {}
    for r in rows:
        versions[r[3]] = versions.get(r[3], 0) + 1
    stored = int(store.db.execute("SELECT count(*) FROM events e" + where, args).fetchone()[0])
    sensors = [
        f"{s}/{n}" if s else n
        for s, n in store.db.execute("SELECT DISTINCT e.station, e.sensor FROM events e" + where, args)
    ]
    labels: dict[int, dict[str, int]] = {}
    for c, label, n in store.db.execute(
        f"SELECT {cluster_of} AS c, e.label, count(*){base} AND e.label != ''"
        " GROUP BY c, e.label ORDER BY count(*) DESC",
        cargs + args,
    ):
        labels.setdefault(int(c), {})[str(label)] = int(n)
    return Data(t0, cluster, station, versions, stored, sorted(sensors), labels, version)


def day_label(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // 10**9, tz=UTC).strftime("%Y-%m-%d")


def when(t_ns: int) -> str:
    return datetime.fromtimestamp(t_ns // 10**9, tz=UTC).strftime("%Y-%m-%d %H:%M UTC")


def section(ident: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{ident}"><h2>{escape(title)}</h2>{note_html}{body}</section>\n'


def table(header: list[str] | None, rows: list[list[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(f'<td class="{"n" if isinstance(v, int | float) else ""}">{escape(str(v))}</td>' for v in r)
        for r in rows
    )
    return f"<table>{head}{body}</table>"


def cards_html(state: Path, version: int | None, d: Data, order: list[int]) -> str:
    if version is None:
        return "<p>No model version has labelled events yet.</p>"
    cards = version_cards(state, version)
    if not cards:
        return f"<p>Model version {version} has no cluster cards.</p>"
    try:
        manifest = json.loads((state / "models" / f"v{version}" / "manifest.json").read_text())
        freqs = FeatureConfig(**manifest["features"]).grid
    except (OSError, ValueError, KeyError, TypeError):
        freqs = np.arange(len(cards[0]["mean_spectrum"][0])) * FeatureConfig().df
    in_period = dict(zip(*np.unique(d.cluster, return_counts=True), strict=True))
    out = []
    for c in cards:
        ident = int(c["cluster"])
        rgb = figures.colour(ident, order)
        swatch = "#{:02x}{:02x}{:02x}".format(*(int(255 * v) for v in rgb[:3]))
        if c.get("f0_hz") is None:
            f0 = "no wing-beat f0 above 40 Hz"
        else:
            lo, hi = c["f0_iqr_hz"]
            harm = " ".join(f"{h:.2f}" for h in c.get("harmonics") or [])
            f0 = f"wing-beat f0 {c['f0_hz']:.1f} Hz (IQR {lo:.0f}–{hi:.0f} Hz); harmonics 1–4: {harm}"
        species = c.get("species") or {}
        labelled = d.labels.get(ident, {})
        comp = (
            table(
                ["label", "training", "period"],
                [[s, species.get(s, 0), labelled.get(s, 0)] for s in sorted(set(species) | set(labelled))][:8],
            )
            if species or labelled
            else '<p class="note">no labelled events</p>'
        )
        plot = figures.card(np.asarray(c["mean_spectrum"]), freqs, c.get("f0_hz"), ident, order)
        out.append(
            f'<div class="card" id="card-{ident}"><h3><span class="swatch" style="background:{swatch}"></span>'
            f"Cluster {ident}</h3><p>{int(c['size'])} training events; {int(in_period.get(ident, 0))} in this "
            f"period</p><p>{escape(f0)}</p>{plot}{comp}</div>"
        )
    return f'<div class="cards">{"".join(out)}</div>'


def render(state: Path, q: Query) -> tuple[str, dict[str, Any]]:
    """The page and what it counted (events, days, stations, model version)."""
    store = Store(state, readonly=True)
    try:
        d = read(store, q)
    finally:
        store.close()
    version = d.version
    clusters = sorted(set(d.cluster.tolist()), key=lambda c: (c < 0, c))
    order = [c for c in clusters if c >= 0]
    stations = sorted(set(d.station.tolist()))
    info: dict[str, Any] = {"events": len(d.t0), "stored": d.stored, "stations": stations, "model_version": version}
    if not len(d.t0):
        info["days"] = 0
        body = section("summary", "Summary", "<p>No events with an output in this period.</p>")
        return page(state, q, body), info
    first_day = int(d.t0.min()) // DAY_NS
    n_days = int(d.t0.max()) // DAY_NS - first_day + 1
    info["days"] = n_days
    days = [day_label((first_day + i) * DAY_NS) for i in range(n_days)]
    col = {c: j for j, c in enumerate(clusters)}
    cj = np.array([col[c] for c in d.cluster.tolist()], np.int64)
    per_day = np.zeros((n_days, len(clusters)), np.int64)
    np.add.at(per_day, (d.t0 // DAY_NS - first_day, cj), 1)
    per_hour = np.zeros((len(clusters), 24), np.int64)
    np.add.at(per_hour, (cj, (d.t0 % DAY_NS) // HOUR_NS), 1)

    novel = int((d.cluster < 0).sum())
    summary = table(
        None,
        [
            ["events with an output", len(d.t0)],
            ["events stored", d.stored],
            ["period", f"{when(int(d.t0.min()))} to {when(int(d.t0.max()))} ({n_days} days)"],
            ["stations", ", ".join(s or "(this daemon)" for s in stations)],
            ["sensors", ", ".join(d.sensors)],
            ["clusters of model version", f"v{version} (the serving one)" if version is not None else "none"],
            ["model versions (events labelled)", ", ".join(f"v{v} ({n})" for v, n in sorted(d.versions.items()))],
            ["clusters", len(order)],
            ["novel (no cluster)", f"{novel} ({100 * novel / len(d.t0):.1f} %)"],
        ],
    )
    body = section("summary", "Summary", summary)
    body += section(
        "cards",
        "Clusters",
        cards_html(state, version, d, order),
        "Mean feature spectrum per channel of the serving model's clusters (solid, dashed: channels), the median "
        "wing-beat fundamental f0 of the cluster's events (▼, solid line) and its harmonics (dotted); labelled "
        "composition.",
    )
    body += section("abundance", "Abundance over time", figures.abundance(days, per_day, clusters, order))
    body += section(
        "diel", "Diel activity", figures.diel(per_hour, clusters), "Each row: the share of that cluster's events."
    )
    known_cols = [j for j, c in enumerate(clusters) if c >= 0]
    windows = day_windows(per_day[:, known_cols], days)
    div_rows = [
        [w["day"], w["events"], *(_ci(w, q_) for q_ in ("q0", "q1", "q2")), _num(w.get("coverage"))] for w in windows
    ]
    body += section(
        "diversity",
        "Diversity per day",
        figures.hill(days, windows)
        + table(["day", "events", "q = 0 (95 %)", "q = 1 (95 %)", "q = 2 (95 %)", "sample coverage"], div_rows),
        "Hill numbers of the clusters: q = 0 counts clusters, q = 1 weighs them by abundance (exp Shannon), q = 2 "
        "counts the dominant ones (inverse Simpson). Novel events are left out.",
    )
    total = per_day[:, known_cols].sum(axis=0)
    if total.sum() > 0:
        body += section(
            "rarefaction",
            "Rarefaction and extrapolation",
            figures.rarefaction(rarefied(total)),
            "Hill numbers of the whole period's clusters expected in a sample of fewer events (solid) and "
            "predicted for up to twice as many (dashed): where the q = 0 curve still climbs, more clusters are "
            "out there than were seen.",
        )
    if len(stations) > 1:
        table_sc = np.zeros((len(stations), len(order)), np.int64)
        si = {s: i for i, s in enumerate(stations)}
        known = d.cluster >= 0
        rows = [si[s] for s in d.station[known].tolist()]
        np.add.at(table_sc, (rows, [col[c] for c in d.cluster[known].tolist()]), 1)
        matrix, metric = station_dissimilarity(table_sc)
        names = [s or "(this daemon)" for s in stations]
        body += section("dissimilarity", "Stations compared", figures.dissimilarity(matrix, names, metric))
    return page(state, q, body), info


def _num(v: Any) -> str:
    return "–" if v is None else f"{float(v):.3g}"


def _ci(w: dict[str, Any], q: str) -> str:
    est = (w.get("estimated") or {}).get(q, w["observed"][q])
    lo, hi = (w.get("ci95") or {}).get(q) or (None, None)
    return f"{_num(est)} ({_num(lo)}–{_num(hi)})" if lo is not None else _num(est)


def page(state: Path, q: Query, body: str) -> str:
    scope = [f"station {q.station or '(this daemon)'}"] if q.station is not None else []
    if q.since_ns:
        scope.append(f"from {when(q.since_ns)}")
    if q.until_ns is not None:
        scope.append(f"until {when(q.until_ns)}")
    sub = f"{state.resolve().name}{'; ' + ', '.join(scope) if scope else ''}; made {when(time.time_ns())}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>Wingbeat report: {escape(state.resolve().name)}</title><style>{STYLE}</style></head><body>"
        f'<h1>Wingbeat report</h1><p class="sub">{escape(sub)}</p>\n{body}</body></html>\n'
    )


def write_report(state: Path, out: Path, q: Query) -> dict[str, Any]:
    html, info = render(state, q)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    return info
