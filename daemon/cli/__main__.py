"""``python -m daemon.cli``: the ``wingbeat`` command."""

from daemon.cli.main import main

main()
