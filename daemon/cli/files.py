"""Files in: ``wingbeat watch``, which sends the audio files a recorder writes into a folder to the daemon."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.app import ClientKey, ServerKey, app, clean_errors, client_curve, emit_json
from daemon.cli.folders import LabelFrom, TimeFrom, audio_options, warn


@app.command()
@clean_errors
def watch(
    folder: Annotated[Path, typer.Argument(help="Folder the recorder writes WAV or FLAC files into.")],
    connect: Annotated[str, typer.Option(help="The daemon's ingest (ROUTER) endpoint.")] = "tcp://127.0.0.1:5555",
    sensor: Annotated[str, typer.Option(help="Sensor name of the events.")] = "watch",
    after_ack: Annotated[
        str, typer.Option(help="What to do with a file the daemon holds: move (to FOLDER/sent/), keep or delete.")
    ] = "move",
    once: Annotated[bool, typer.Option(help="Send the files there now, then exit once all are acked.")] = False,
    poll: Annotated[float, typer.Option(min=0.01, help="Seconds between looks at the folder.")] = 1.0,
    window: Annotated[int, typer.Option(min=1, help="Files in flight without an ack.")] = 64,
    ack_timeout: Annotated[float, typer.Option(min=0.01, help="Seconds before an unacked file is resent.")] = 5.0,
    give_up: Annotated[
        float, typer.Option(min=0.1, help="Seconds without an ack before a round gives up (tried again next poll).")
    ] = 60.0,
    label_from: LabelFrom = None,
    time_from: TimeFrom = "mtime",
    client_key: ClientKey = None,
    server_key: ServerKey = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
) -> None:
    """Send each complete audio file that appears in FOLDER to the daemon, exactly once (a journal beside FOLDER
    keeps the sequence numbers across restarts). Exit 2 when files were there and none could be sent."""
    from daemon.cli.watch import Watcher

    curve = client_curve(client_key, server_key)
    w = Watcher(
        folder, connect, sensor, audio_options(label_from, time_from), after_ack, poll, window, ack_timeout,
        give_up, curve, warn,
    )  # fmt: skip
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    res = w.run(once=once, stop=lambda: bool(stopping))
    if res.problems:
        warn(f"{res.problems} files in {folder} could not be sent")
    if as_json:
        emit_json(res.to_dict())
    else:
        typer.echo(
            f"acked {res.acked} ({res.duplicates} already stored), rejected {res.rejected}, "
            f"problems {res.problems}, unacked {res.unacked} in {res.seconds:.1f} s"
        )
    if once and res.acked == 0 and res.problems:
        raise typer.Exit(2)
    if res.unacked or res.rejected:
        raise typer.Exit(1)
