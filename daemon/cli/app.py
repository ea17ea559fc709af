"""The one typer ``app`` of the ``wingbeat`` command and what its command modules share: the device and mode
choices, ``clean_errors`` (bad input ends with one line and exit status 2) and ``emit_json``."""

from __future__ import annotations

import json
from collections.abc import Callable
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    help="Wingbeat: cluster optically recorded insect signals into species groups with a dynamic β-VAE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


class Mode(str, Enum):
    dynamic = "dynamic"
    vanilla = "vanilla"
    fixed = "fixed"


class ClusterMethod(str, Enum):
    ward = "ward"
    dp = "dp"
    bic = "bic"
    density = "density"


class Select(str, Enum):
    best = "best"
    cluster = "cluster"
    last = "last"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def clean_errors(fn: F) -> F:
    """Bad input ends with one line on stderr and exit status 2, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from daemon.data.datasets import DatasetError
        from daemon.store.db import StoreError
        from model.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (DatasetError, CheckpointError, StoreError, FileExistsError, ValueError, OSError) as e:
            typer.echo(f"wingbeat: error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def pick_device(choice: Device) -> Any:
    import torch

    if choice is Device.cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if choice is Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice.value)


def without_nproc(argv: list[str]) -> list[str]:
    """The command line again, without ``--nproc N`` (the ranks it launches train as one each)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def emit_json(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, allow_nan=False))


# CURVE on a client's socket (docs/security.md): the options of replay, tail and watch
ClientKey = Annotated[
    Path | None, typer.Option(help="CURVE: this client's secret certificate (NAME.key_secret from `wingbeat keys`).")
]
ServerKey = Annotated[Path | None, typer.Option(help="CURVE: the daemon's public certificate (NAME.key).")]


def client_curve(client_key: Path | None, server_key: Path | None) -> Any:
    """CURVE keys for a client, both or neither."""
    from daemon.cli.clients import Curve

    if (client_key is None) != (server_key is None):
        raise ValueError("--client-key and --server-key go together (CURVE needs both)")
    return Curve(client_key, server_key) if client_key and server_key else None
