"""What a deployment gives back: ``export`` (CSV, NumPy, Parquet, a Darwin Core Archive) and ``report`` (one
self-contained HTML page). Registered on the one ``app`` of ``daemon.cli.app``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from daemon.cli.app import app, clean_errors

if TYPE_CHECKING:
    from daemon.report.export import Query

State = Annotated[Path, typer.Option(help="State directory.")]
Since = Annotated[
    str | None, typer.Option(help="Only events from this time on (ISO 8601, UTC unless it says; or ns since epoch).")
]
Until = Annotated[str | None, typer.Option(help="Only events before this time (as --since).")]
Station = Annotated[
    str | None, typer.Option(help="Only this station's events (at a centre; '' = the daemon's own events).")
]


class Format(str, Enum):
    table = "table"
    dwca = "dwca"


class By(str, Enum):
    hour = "hour"
    day = "day"
    week = "week"


def parse_time(text: str | None, flag: str) -> int | None:
    """ns since the epoch from an integer or an ISO 8601 time (UTC when it names no zone); None for None."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{flag}: not an ISO 8601 time or ns since epoch: {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def _query(since: str | None, until: str | None, station: str | None) -> Query:
    from daemon.report.export import Query

    since_ns, until_ns = parse_time(since, "--since"), parse_time(until, "--until")
    if since_ns is not None and until_ns is not None and until_ns <= since_ns:
        raise ValueError(f"--until ({until}) must come after --since ({since})")
    return Query(since_ns or 0, until_ns, station)


@app.command()
@clean_errors
def export(
    out: Annotated[Path, typer.Option(help="FILE.csv, FILE.npz or FILE.parquet; FILE.zip with --format dwca.")],
    state: State = Path("wingbeat-state"),
    since: Since = None,
    until: Until = None,
    station: Station = None,
    format: Annotated[
        Format, typer.Option(help="table: one row per output (by --out's suffix); dwca: a Darwin Core Archive.")
    ] = Format.table,
    by: Annotated[By, typer.Option(help="dwca: one sampling event per station and UTC hour, day or week.")] = By.day,
    location: Annotated[
        str, typer.Option(help="dwca: locationID of the daemon's own events (pooled events keep their station's).")
    ] = "local",
    title: Annotated[str, typer.Option(help="dwca: the data set's title (eml.xml).")] = "",
    creator: Annotated[str, typer.Option(help="dwca: who made the data set (eml.xml creator and contact).")] = (
        "Wingbeat deployment"
    ),
    licence: Annotated[str, typer.Option(help="dwca: the licence statement (eml.xml intellectualRights).")] = (
        "This work is licensed under a Creative Commons Attribution (CC-BY 4.0) License."
    ),
) -> None:
    """Outputs with their event metadata (and the event's meta JSON), for analysis; or a Darwin Core Archive of
    counts per station, period and cluster, for GBIF."""
    from daemon.report.export import export_table

    q = _query(since, until, station)
    if format is Format.dwca:
        from daemon.report.dwca import write_dwca

        events, occurrences, counted = write_dwca(state, out, q, by.value, location, title, creator, licence)
        typer.echo(f"wrote {out}: {events} sampling events, {occurrences} occurrences of {counted} insect events")
        return
    n = export_table(state, out, q)
    typer.echo(f"wrote {out}: {n} outputs")


@app.command()
@clean_errors
def report(
    out: Annotated[Path, typer.Option(help="The page to write (.html).")],
    state: State = Path("wingbeat-state"),
    since: Since = None,
    until: Until = None,
    station: Station = None,
) -> None:
    """One self-contained HTML page for a deployment (no outside request: it opens offline): summary, cluster
    cards, abundance over time, diel activity, diversity per day with intervals, rarefaction, and at a centre the
    stations' dissimilarity."""
    from daemon.report.html import write_report

    if out.suffix not in (".html", ".htm"):
        raise ValueError(f"--out must end in .html, got {out.name}")
    t = time.monotonic()
    info = write_report(state, out, _query(since, until, station))
    days = f"{info['days']} day{'' if info['days'] == 1 else 's'}"
    typer.echo(f"wrote {out}: {info['events']} events, {days} in {time.monotonic() - t:.1f} s")
