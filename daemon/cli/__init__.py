"""The ``wingbeat`` command line: ``app`` (the typer app and shared helpers), one module per command group
(``model``, ``station``, ``central``, ``diversity``, ``files``), the clients (``clients``: replay and tail; ``watch``)
and ``main``.

Thread limits are set here, before numpy and torch load: one thread per library in the serving loop (DESIGN §7)."""

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
