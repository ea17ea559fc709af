"""``wingbeat central``: the centre of a network of stations (DESIGN §9, docs/network.md). Registered on the one
``app`` of ``daemon.cli.app``.

The centre is the daemon (``daemon.serve.service.Service``) with its network stage in centre mode: events come from the
stations through a durable JetStream consumer instead of ZeroMQ, and the schedule, drift trigger, gate and stable
cluster IDs of the single daemon run on the pooled store. Its ZeroMQ endpoints listen on loopback ports the OS
picks (``endpoints.json`` names them): a local instrument or subscriber may use them, nothing needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from daemon.cli.app import app, clean_errors


@app.command()
@clean_errors
def central(
    nats: Annotated[str, typer.Option(help="NATS server URL(s), comma-separated (nats:// or tls://).")],
    state: Annotated[Path, typer.Option(help="State directory: the pooled store, model versions.")],
    config: Annotated[Path | None, typer.Option(help="TOML config file (training, network: creds and TLS, …).")] = None,
    metrics: Annotated[str | None, typer.Option(help="HOST:PORT of /metrics and /healthz ('' = off).")] = None,
    first_training_after: Annotated[int | None, typer.Option(help="Pooled events before the first training.")] = None,
    gpus: Annotated[
        int, typer.Option(min=0, help="GPUs to train on: CUDA, one torchrun rank each (0 = the config's device).")
    ] = 0,
    nproc: Annotated[
        int | None, typer.Option(min=1, help="Training ranks under torchrun (default: --gpus, or the config's).")
    ] = None,
    replicas: Annotated[int | None, typer.Option(min=1, max=5, help="Stream and bucket replicas.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Pool the stations' events, train on them, and put accepted versions where every station takes them."""
    from daemon.ops import logs
    from daemon.ops.config import load
    from daemon.serve.service import Service

    overrides = {
        "state_dir": str(state),
        "network.nats": nats,
        "network.role": "centre",
        "network.station": "",
        "network.replicas": replicas,
        "ingest.endpoint": "tcp://127.0.0.1:0",
        "ingest.plain_endpoint": "",
        "publish.endpoint": "tcp://127.0.0.1:0",
        "metrics.listen": metrics,
        "training.first_after": first_training_after,
        "training.device": "cuda" if gpus > 0 else None,
        "training.nproc": nproc if nproc is not None else (gpus or None),
    }
    cfg = load(config, overrides)
    logs.configure(log_level)
    import torch

    torch.set_num_threads(1)
    raise typer.Exit(Service(cfg, config, overrides).run())
