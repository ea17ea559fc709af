"""What every command that reads a folder of audio files shares: ``--label-from``, ``--time-from`` and the line
that names a file it could not read. No commands here, so any command module may import it."""

from __future__ import annotations

from typing import Annotated, Any

import typer

LabelFrom = Annotated[
    str | None,
    typer.Option(help="For a folder of audio files: 'parent' takes each file's label from its folder's name."),
]
TimeFrom = Annotated[
    str,
    typer.Option(
        help="For a folder of audio files: each event's time from the file's 'mtime', or 'name:<strftime "
        "pattern>' matched against the file's name without its suffix (UTC unless the pattern has %z)."
    ),
]


def audio_options(label_from: str | None, time_from: str) -> Any:
    from daemon.data.audio import AudioOptions

    return AudioOptions(label_from=label_from, time_from=time_from)


def warn(line: str) -> None:
    typer.echo(f"wingbeat: {line}", err=True)
