"""The daemon's side of the ``wingbeat`` command: ``run``, ``check-config``, ``replay``, ``tail``, ``keys``,
``status``, ``retrain`` and ``demo``. Registered on the one ``app`` of ``daemon.cli.app``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.app import ClientKey, Device, ServerKey, app, clean_errors, client_curve, emit_json
from daemon.cli.folders import LabelFrom, TimeFrom, audio_options, warn


def _config(config: Path | None, overrides: dict[str, Any]) -> Any:
    from daemon.ops.config import load

    return load(config, overrides)


def _endpoints(state: Path) -> dict[str, str]:
    """Where a daemon with this state directory listens (it writes this file once bound)."""
    f = state / "endpoints.json"
    try:
        return dict(json.loads(f.read_text()))
    except (OSError, ValueError):
        return {}


@app.command()
@clean_errors
def run(
    config: Annotated[Path | None, typer.Option(help="TOML config file (every key has a default).")] = None,
    state: Annotated[Path | None, typer.Option(help="State directory: store, model versions.")] = None,
    ingest: Annotated[str | None, typer.Option(help="ROUTER endpoint for senders that read acks.")] = None,
    ingest_plain: Annotated[str | None, typer.Option(help="PULL endpoint for senders that cannot read acks.")] = None,
    publish: Annotated[str | None, typer.Option(help="PUB endpoint for outputs.")] = None,
    metrics: Annotated[str | None, typer.Option(help="HOST:PORT of /metrics and /healthz ('' = off).")] = None,
    model: Annotated[Path | None, typer.Option(help="Start from this model version (trained offline).")] = None,
    first_training_after: Annotated[int | None, typer.Option(help="Events before the first training.")] = None,
    device: Annotated[Device | None, typer.Option(help="Where the trainer trains.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the daemon: ingest, store, cluster, publish; train in the background. SIGTERM stops it cleanly."""
    from daemon.ops import logs
    from daemon.serve.service import Service

    overrides = {
        "state_dir": str(state) if state else None,
        "ingest.endpoint": ingest,
        "ingest.plain_endpoint": ingest_plain,
        "publish.endpoint": publish,
        "metrics.listen": metrics,
        "model": str(model) if model else None,
        "training.first_after": first_training_after,
        "training.device": device.value if device else None,
    }
    cfg = _config(config, overrides)
    logs.configure(log_level)
    import torch

    torch.set_num_threads(1)
    raise typer.Exit(Service(cfg, config, overrides).run())


@app.command("check-config")
@clean_errors
def check_config(config: Annotated[Path, typer.Argument(help="TOML config file.")]) -> None:
    """Validate a config file and print the effective configuration."""
    from daemon.ops.config import to_toml

    typer.echo(to_toml(_config(config, {})), nl=False)


@app.command()
@clean_errors
def replay(
    data: Annotated[Path, typer.Argument(help="Recordings data set (.npz), or a folder of WAV/FLAC files.")],
    connect: Annotated[str, typer.Option(help="The daemon's ingest (ROUTER) endpoint.")] = "tcp://127.0.0.1:5555",
    rate: Annotated[float, typer.Option(min=0.0, help="Events per second (0 = as fast as acks allow).")] = 0.0,
    sensor: Annotated[str, typer.Option(help="Sensor name (when the file names none).")] = "replay",
    start_seq: Annotated[int, typer.Option(min=0, help="First sequence number.")] = 0,
    window: Annotated[int, typer.Option(min=1, help="Events in flight without an ack.")] = 256,
    ack_timeout: Annotated[float, typer.Option(min=0.01, help="Seconds before an unacked event is resent.")] = 5.0,
    give_up: Annotated[
        float, typer.Option(min=0.1, help="Seconds without an ack before giving up (holds with no daemon).")
    ] = 120.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    label_from: LabelFrom = None,
    time_from: TimeFrom = "mtime",
) -> None:
    """Send a recordings file (or a folder of audio files, each event's meta naming its file) to the daemon; exit 0
    only when every event is acknowledged."""
    from daemon.cli.clients import events_of
    from daemon.cli.clients import replay as send
    from daemon.data.datasets import load_recordings

    rec = load_recordings(data, audio_options(label_from, time_from), warn)
    events = events_of(rec, sensor, start_seq, sensor_from_file=True)
    if rec.meta is not None:
        events = _with_meta(events, rec.meta)
    curve = client_curve(client_key, server_key)
    res = send(events, connect, rate, window, ack_timeout, give_up, curve=curve)
    if as_json:
        emit_json(res.to_dict())
    else:
        typer.echo(
            f"sent {res.sent}, acked {res.acked} ({res.duplicates} already stored), resent {res.resent}, "
            f"rejected {sum(res.rejected.values())} {res.rejected or ''}, unacked {res.unacked}; "
            f"{res.events_per_s:.0f} events/s over {res.seconds:.1f} s"
        )
    if res.unacked or res.rejected or res.acked != len(rec):
        raise typer.Exit(1)


def _with_meta(events: Iterator[Any], meta: list[dict[str, Any]]) -> Iterator[Any]:
    """Events with their meta (the file each was read from)."""
    for ev, m in zip(events, meta, strict=True):
        ev.meta = m
        yield ev


@app.command()
@clean_errors
def tail(
    connect: Annotated[str, typer.Option(help="The daemon's publish endpoint.")] = "tcp://127.0.0.1:5556",
    topic: Annotated[str, typer.Option(help="Topic prefix, e.g. cluster.lidar1")] = "cluster.",
    count: Annotated[int, typer.Option(min=0, help="Stop after this many outputs (0 = never).")] = 0,
    timeout: Annotated[float, typer.Option(min=0.01, help="Stop after this many seconds without an output.")] = 3600.0,
    client_key: ClientKey = None,
    server_key: ServerKey = None,
) -> None:
    """Print published outputs, one JSON object per line."""
    from daemon.cli.clients import tail as follow

    curve = client_curve(client_key, server_key)
    follow(connect, topic, count, timeout, lambda body: typer.echo(json.dumps(body)), curve=curve)


@app.command()
@clean_errors
def keys(
    out: Annotated[Path, typer.Option(help="Directory for the key pair.")],
    name: Annotated[str, typer.Option(help="Name of the pair: NAME.key (public), NAME.key_secret (secret).")],
) -> None:
    """Make a CURVE key pair for the daemon (security.server_secret_key) or for a client (its NAME.key goes into
    the daemon's security.clients_dir; the client keeps NAME.key_secret)."""
    from daemon.ops.security import create_keys

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--name: not a file name: {name!r}")
    public, secret = create_keys(out, name)
    typer.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it on the machine that uses it)")


def _cards(state: Path, version: int | None) -> list[dict[str, Any]]:
    """The cluster cards (model.cards) in a model version's manifest; none for versions written before them."""
    if version is None:
        return []
    try:
        return list(json.loads((state / "models" / f"v{version}" / "manifest.json").read_text()).get("cards", []))
    except (OSError, ValueError):
        return []


@app.command()
@clean_errors
def status(
    state: Annotated[Path, typer.Option(help="State directory.")] = Path("wingbeat-state"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Events per sensor and per cluster, quarantine by reason, model versions, trainings, the serving model's
    cluster cards (size, wing-beat f0, harmonics, labelled species)."""
    import time
    from datetime import UTC, datetime

    from daemon.store.db import Store
    from model.cards import format_cards

    store = Store(state, readonly=True)
    try:
        info = store.summary()
        info["models"] = store.models()
    finally:
        store.close()
    serving = [m for m in info["models"] if m["status"] == "serving"]
    info["serving"] = serving[-1]["version"] if serving else None
    info["cards"] = _cards(state, info["serving"])
    info["endpoints"] = _endpoints(state)
    try:
        info["daemon"] = json.loads((state / "daemon-status.json").read_text())
    except (OSError, ValueError):
        info["daemon"] = None
    if as_json:
        emit_json(info)
        return
    typer.echo(
        f"store {state}: {info['events']} events ({info['labelled']} labelled), {info['outputs']} outputs, "
        f"{info['raw_kept']} with raw samples, {info['bytes'] / 1e6:.1f} MB"
    )
    typer.echo("per sensor:  " + (", ".join(f"{k} {v}" for k, v in info["per_sensor"].items()) or "none"))
    if set(info["per_station"]) - {""}:  # a centre: the stations' events ('' = its own)
        typer.echo("per station: " + ", ".join(f"{k or '(own)'} {v}" for k, v in info["per_station"].items()))
    typer.echo("per cluster: " + (", ".join(f"{k}: {v}" for k, v in info["per_cluster"].items()) or "none"))
    typer.echo("quarantine:  " + (", ".join(f"{k} {v}" for k, v in info["quarantine"].items()) or "empty"))
    for m in info["models"]:
        gm = m["metrics"]
        extra = ", ".join(
            f"{k} {gm[k]:.4g}" for k in ("val_rec", "ari", "n_clusters", "events") if isinstance(gm.get(k), int | float)
        )
        typer.echo(f"model v{m['version']}: {m['status']} ({m['kind']}) {extra} {m['reason']}".rstrip())
    if not info["models"]:
        typer.echo("no model yet")
    if info["cards"]:
        typer.echo(f"clusters of the serving model v{info['serving']}:")
        for line in format_cards(info["cards"]):
            typer.echo("  " + line)
    if info["models"]:
        last = info["models"][-1]
        when = datetime.fromtimestamp(last["created_ns"] / 1e9, tz=UTC).isoformat(timespec="seconds")
        typer.echo(f"last training: v{last['version']} ({last['kind']}, {last['status']}) at {when}")
    d = info["daemon"]
    if d:
        age = time.time() - d["updated_ns"] / 1e9
        typer.echo(
            f"daemon pid {d['pid']} ({'up' if age < 10 else f'no update for {age:.0f} s'}): "
            f"{d['events_per_s']} events/s; next training: {d['next_training']}"
        )


@app.command()
@clean_errors
def retrain(
    state: Annotated[Path, typer.Option(help="State directory of the running daemon.")] = Path("wingbeat-state"),
) -> None:
    """Ask the running daemon for a full retrain now (also: kill -USR1 <pid>)."""
    from daemon.train.supervisor import RETRAIN_REQUEST

    if not state.is_dir():
        raise ValueError(f"{state}: no such state directory")
    (state / RETRAIN_REQUEST).touch()
    typer.echo(f"retrain requested in {state}; the daemon starts it within a second or two")


@app.command()
def demo(
    events: Annotated[int, typer.Option(min=100, help="Simulated events to send.")] = 4000,
    rate: Annotated[float, typer.Option(min=1.0, help="Events per second.")] = 200.0,
) -> None:
    """Start the daemon on embedded defaults, feed it a simulated instrument, and show what it does."""
    from daemon.cli.demo import run_demo

    raise typer.Exit(run_demo(events=events, rate=rate))
