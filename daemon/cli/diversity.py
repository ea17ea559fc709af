"""``wingbeat diversity``: Hill numbers per window of event time, from the store (``daemon.report.windows``).
Registered on the one ``app`` of ``daemon.cli.app``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.app import app, clean_errors, emit_json
from daemon.cli.outputs import parse_time


class By(str, Enum):
    hour = "hour"
    day = "day"
    week = "week"
    all = "all"
    station = "station"


@app.command()
@clean_errors
def diversity(
    state: Annotated[Path, typer.Option(help="State directory.")] = Path("wingbeat-state"),
    by: Annotated[
        By,
        typer.Option(help="Windows: UTC hour, day or ISO week; all (one window); station (one per station)."),
    ] = By.day,
    station: Annotated[str | None, typer.Option(help="Only this station's events ('' = the daemon's own).")] = None,
    sensor: Annotated[str | None, typer.Option(help="Only this sensor's events.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only events from this time on (ISO 8601 date or time, UTC unless it says).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only events before this time (as --since).")] = None,
    as_served: Annotated[
        bool,
        typer.Option(
            "--as-served", help="Count the published clusters, not the serving version's labels of the history."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap intervals.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object a line, one per window.")] = False,
) -> None:
    """Richness and Hill numbers (q = 0, 1, 2: observed, estimated, 95 % interval) and sample coverage per window
    of event time. Every window is labelled by the serving version (history is re-labelled in the background when a
    version starts serving; events not re-labelled yet are counted as pending); --as-served counts the published
    clusters. With --by station at a centre, also the network's gamma, mean alpha, beta and the stations'
    dissimilarity."""
    from daemon.report.windows import diversity_windows, network

    since_ns, until_ns = parse_time(since, "--since"), parse_time(until, "--until")
    if since_ns is not None and until_ns is not None and until_ns <= since_ns:
        raise ValueError(f"--until ({until}) must come after --since ({since})")
    windows = diversity_windows(
        state,
        by.value,
        station=station,
        sensor=sensor,
        since_ns=since_ns,
        until_ns=until_ns,
        as_served=as_served,
        seed=seed,
    )
    net = network(windows) if by is By.station and len(windows) > 1 else None
    if as_json:
        for w in windows:
            emit_json(w)
        if net is not None:
            emit_json(net)
        return
    typer.echo(table(windows))
    if net is not None:
        typer.echo(network_table(net["network"]))


def _num(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(windows: list[dict[str, Any]]) -> str:
    """Aligned columns, one line per window, and a line on what is still being re-labelled."""
    if not windows:
        return "no events"
    head = ["station", "start", "events", "novel", "pending", "version", "clusters", "q0", "q1", "q2"]
    head += ["q0 est [95 %]", "q1 est", "q2 est", "coverage"]
    rows = [head]
    for w in windows:
        o, e, ci = w["observed"], w["estimated"], w["ci95"]
        v = w["model_version"]
        rows.append(
            [
                w["station"] or "-",
                w["start"].replace("+00:00", "Z"),
                str(w["events"]),
                str(w["novel"]),
                str(w["pending"]),
                "-" if v is None else ",".join(map(str, v)) if isinstance(v, list) else str(v),
                str(len(w["abundance"])),
                _num(o["q0"], 0),
                _num(o["q1"], 2),
                _num(o["q2"], 2),
                f"{_num(e['q0'])} [{_num(ci['q0'][0])}, {_num(ci['q0'][1])}]",
                _num(e["q1"], 2),
                _num(e["q2"], 2),
                _num(w["coverage"], 3),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(n) if i >= 2 else c.ljust(n) for i, (c, n) in enumerate(zip(r, widths, strict=True)))
             for r in rows]  # fmt: skip
    pending = sum(w["pending"] for w in windows)
    if pending:
        lines.append(
            f"{pending} events are not labelled by the serving version yet (re-labelling is under way, or they "
            "wait for a first model): left out of the figures above"
        )
    return "\n".join(lines)


def network_table(net: dict[str, Any]) -> str:
    lines = ["network  " + "  ".join(f"q{q}: gamma {net['gamma'][f'q{q}']:.2f}" for q in (0, 1, 2) if "gamma" in net)]
    for name in ("alpha", "beta"):
        if name in net:
            lines.append(f"{name:>7}  " + "  ".join(f"q{q}: {net[name][f'q{q}']:.2f}" for q in (0, 1, 2)))
    stations = [s or "-" for s in net["stations"]]
    width = max(8, *(len(s) for s in stations))
    for metric in ("bray_curtis", "sorensen"):
        lines.append(f"\n{metric}")
        lines.append(" " * width + "  " + "  ".join(s.rjust(width) for s in stations))
        for s, row in zip(stations, net[metric], strict=True):
            lines.append(s.ljust(width) + "  " + "  ".join(f"{x:.3f}".rjust(width) for x in row))
    return "\n".join(lines)
