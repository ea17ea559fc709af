"""The ``wingbeat`` command (typer). Reads flags into frozen configs, calls the core, prints results.

Each command group registers its commands on the one ``app`` of ``daemon.cli.app`` when imported; ``main`` imports
them in the order ``wingbeat --help`` lists them, then runs the app."""

from __future__ import annotations

import importlib

from daemon.cli.app import app

COMMAND_GROUPS = ("model", "station", "outputs", "diversity", "central", "files")


def main() -> None:
    for group in COMMAND_GROUPS:
        importlib.import_module(f"daemon.cli.{group}")
    app()
