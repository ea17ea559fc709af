"""The background trainer: its own process, started by the daemon for each training run.

    python -m daemon.train.trainer --state DIR --version N --kind first|finetune|full --config-file F [--parent DIR]
        [--parent-pid PID]

``F`` holds the daemon's configuration (JSON of ``Config.to_dict()``), validated again here like a config file.
Under torchrun (``training.nproc`` > 1) every rank trains on its share of the events; rank 0 reports and writes.

Reads features from the store (read-only), trains (a fine-tune continues the parent's weights and β schedule),
fits the latent clusters, gives them the serving model's cluster IDs (Hungarian matching on the events both
models saw), measures what the gate needs on held-out events, and writes ``models/v<N>`` atomically. It reports
on stdout, one JSON object per line: ``{"type": "epoch", …}`` per epoch, then ``{"type": "done", …}`` or
``{"type": "error", "message": …}``. A crash, an OOM kill or a NaN here never touches serving; the trainer runs
at the lowest CPU priority and dies with the daemon.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.ops.faults import crash_point

if TYPE_CHECKING:
    from daemon.ops.config import Config

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

KINDS = ("first", "finetune", "full")
# a new model's cluster is split when its own best Ward cut scores this silhouette (chosen on 18 simulated
# deployments, checked on 12 others: docs/RESULTS.md "Counting species")
SPLIT_SILHOUETTE = 0.65
PR_SET_PDEATHSIG = 1


def tie_to_parent(parent_pid: int) -> None:
    """Die with the daemon: SIGKILL when the parent exits (Linux; the daemon, or torchrun between them), and exit
    now if the daemon is gone already (it may have died between starting this process and this call). A trainer
    that outlived its daemon would race the next daemon's trainer for the store and the version directories."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux; the daemon is still checked between epochs
    if not daemon_alive(parent_pid):
        raise SystemExit(f"the daemon (pid {parent_pid}) is gone")


def daemon_alive(pid: int) -> bool:
    """Whether the daemon that started this training still runs (0: no daemon to follow)."""
    if not pid:
        return True
    if os.getppid() == pid:
        return True
    try:
        os.kill(pid, 0)  # under torchrun the daemon is a grandparent: it may be anywhere above
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return os.getppid() != 1  # orphaned (re-parented to init): the daemon that started it is gone


IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers of ioprio_set
IOPRIO_CLASS_IDLE, IOPRIO_WHO_PROCESS = 3, 1


def lower_priority(idle: bool, nice: int) -> str:
    """Serving comes first: SCHED_IDLE (the trainer runs only on a core nothing else wants) and the idle I/O
    class (its reads of torch and the store wait for the serving loop's commits and their fsyncs); else
    ``nice``."""
    if idle and hasattr(os, "sched_setscheduler"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            idle = False
    if idle:
        try:
            import ctypes
            import platform

            number = IOPRIO_SET.get(platform.machine())
            if number is not None:
                ctypes.CDLL(None, use_errno=True).syscall(number, IOPRIO_WHO_PROCESS, 0, IOPRIO_CLASS_IDLE << 13)
        except (OSError, AttributeError):
            pass  # CPU priority alone
        return "idle"
    os.nice(nice)
    return f"nice {nice}"


def recipe(kind: str, restarts: int, parent_cluster: dict[str, Any] | None = None) -> tuple[str, int, str, float]:
    """How a training of ``kind`` keeps its epoch and cuts its clusters: (``TrainConfig.select``, trainings,
    ``ClusterConfig.method``, ``ClusterConfig.split_silhouette``).

    A new model (the first, or a full retrain) finds its clusters by density in the training events' features
    (``ClusterConfig(method="density")``: HDBSCAN on their principal components), splits its groups again in the
    latent where density found no structure (one group holding most of the events; ``SPLIT_SILHOUETTE``), and
    keeps the epoch of the best held-out ELBO. A short training's latent merges species that its features still
    keep apart; on simulated deployments this counts species closer than Ward's cut of the latent at the
    clustering criterion's epoch, the rule before it (docs/RESULTS.md "Counting species": held-out seeds, first
    model, daily q1 error 24.9 % → 15.0 %, and on 12 fresh ones 20.4 % → 15.0 % once the split was kept for
    groups density could not part). The first model is trained ``restarts`` times (``training.first_restarts``),
    the most agreeing kept; a full retrain once. A fine-tune continues its parent and cuts its clusters by the
    parent's rule (``parent_cluster``: the parent manifest's ``cluster``: its method and split), so a model given
    by ``wingbeat train`` stays cut as it was, ``--clusters dp`` included.
    """
    if kind == "finetune":
        parent = parent_cluster or {}
        return "best", 1, str(parent.get("method", "ward")), float(parent.get("split_silhouette", 0.0))
    if kind not in ("first", "full"):
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return "best", restarts if kind == "first" else 1, "density", SPLIT_SILHOUETTE


def rest_after(busy_s: float, share: float) -> float:
    """Seconds to rest after ``busy_s`` seconds of work so that the work takes ``share`` of the time."""
    return max(0.0, busy_s) * (1 / share - 1)


def say(msg_type: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"type": msg_type, **fields}, allow_nan=False, default=float) + "\n")
    sys.stdout.flush()


def held_out_error(model: Any, x: Any) -> float:
    from model.train import encode_mu

    if len(x) == 0:
        return math.nan
    return float(encode_mu(model, x)[1].double().mean())


def run(args: argparse.Namespace, cfg: Config) -> dict[str, Any] | None:
    import numpy as np
    import torch

    from daemon.store.db import Store
    from daemon.store.versions import read_version, write_version
    from daemon.train import ddp
    from model.beta import BetaConfig, BetaSchedule
    from model.build import build
    from model.checkpoint import pack
    from model.cluster import ClusterConfig, align_ids
    from model.evaluate import scores
    from model.spectra import FeatureConfig
    from model.train import TrainConfig, batch_size_for, encode_mu
    from model.vae import VAEConfig

    t = cfg.training
    torch.set_num_threads(t.threads)
    dev = torch.device("cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu")
    shard = ddp.join(dev.type == "cuda")
    if shard is not None:
        dev = ddp.local_device(dev.type == "cuda")
    rank = shard.rank if shard is not None else 0
    store = Store(Path(args.state), readonly=True)
    try:
        # The newest half and an even sample of the older events: a fine-tune keeps seeing what came before
        ids, x, labels = store.training_set(t.max_events, recent=max(1, t.max_events // 2))
        if len(ids) < 16:
            raise ValueError(f"only {len(ids)} events with features in the store; need at least 16")
        parent = read_version(args.parent) if args.parent else None
        epochs = {"first": t.epochs_first, "finetune": t.epochs_finetune, "full": t.epochs_full}[args.kind]
        features = FeatureConfig(**(store.feature_config() or {}))
        labelled = labels != ""
        batch = batch_size_for(len(ids))
        # the kept epoch, the trainings and the cut: ``recipe``
        select, restarts, method, split = recipe(
            args.kind, t.first_restarts, parent.manifest.get("cluster") if parent else None
        )
        train_cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch,
            seed=t.seed + args.version,
            beta=BetaConfig(warmup=min(25, max(0, epochs // 4))),
            semi_supervised=bool(len(set(labels[labelled])) >= 2),
            select=select,
            restarts=restarts,
        )
        cluster_cfg = ClusterConfig(method=method, seed=train_cfg.seed, split_silhouette=split)
        init = schedule = None
        if args.kind == "finetune":
            if parent is None:
                raise ValueError("a fine-tune needs --parent")
            init = parent.model.state_dict()
            schedule = BetaSchedule.from_dict(parent.manifest["beta_schedule"])
            train_cfg = replace(
                train_cfg,
                beta=schedule.cfg,
                gamma=TrainConfig.from_dict(parent.manifest["train"]).gamma,  # the parent's label loss and γ cycle
            )
        vae_cfg = parent.model.cfg if (parent is not None and args.kind == "finetune") else VAEConfig(n_in=x.shape[1])
        if vae_cfg.n_in != x.shape[1]:
            raise ValueError(f"the store's features have {x.shape[1]} values, the parent model takes {vae_cfg.n_in}")
        t0 = time.monotonic()
        # reported epochs count on through the restarts (``Training.total_epochs``): one progress from start to end
        reported = itertools.count()

        def on_epoch(s: Any) -> None:
            if dev.type == "cpu":
                time.sleep(rest_after(s.seconds, t.cpu_share))
            if s.epoch == 3:
                crash_point("trainer_epoch")
            if not daemon_alive(args.parent_pid):
                raise SystemExit("the daemon is gone")
            if rank != 0:
                return
            say(
                "epoch",
                epoch=next(reported),
                epochs=t.total_epochs(args.kind),
                beta=s.beta,
                gamma=s.gamma,
                rec=s.rec,
                kl=s.kl,
                cls=s.cls,
                val_rec=None if math.isnan(s.val_rec) else s.val_rec,
                seconds=s.seconds,
            )

        built = build(
            x,
            labels,
            vae_cfg,
            train_cfg,
            cluster_cfg,
            dev,
            on_epoch,
            init=init,
            schedule=schedule,
            shard=shard,
        )
        if rank != 0:  # rank 0 measures, aligns and writes; the others wait for it and go
            ddp.leave()
            return None
        # Held-out events of this training: the gate compares both models on them.
        val = built.result.val_index.numpy()
        xt = torch.from_numpy(x)
        metrics: dict[str, Any] = {
            "events": len(ids),
            "first_event": int(ids[0]),
            "last_event": int(ids[-1]),
            "val_rec": held_out_error(built.model, xt[val]),
            "n_clusters": built.clusterer.k,
            "seconds": time.monotonic() - t0,
            "device": str(dev),
            "final_beta": built.result.schedule.beta,
            "train_rec": float(encode_mu(built.model, xt)[1].double().mean()),
        }
        mu_new = encode_mu(built.model, xt)[0].double().numpy()
        next_id = 0
        if parent is not None:
            metrics["parent_val_rec"] = held_out_error(parent.model, xt[val])
            served = store.outputs_for(ids)  # the IDs users have seen for these events
            next_id = int(parent.manifest.get("next_cluster_id", int(parent.clusterer.ids.max()) + 1))
            next_id = max(next_id, int(served.max()) + 1)
            built.clusterer.ids = align_ids(served, built.clusterer.components(mu_new), built.clusterer.k, next_id)
        next_id = max(next_id, int(built.clusterer.ids.max()) + 1)
        if labelled.sum() >= 2:
            new_pred = built.clusterer.assign(mu_new[labelled]).cluster
            metrics["ari"] = scores(labels[labelled], new_pred)["ari"]
            if parent is not None:
                mu_old = encode_mu(parent.model, xt[torch.from_numpy(labelled)])[0].double().numpy()
                metrics["parent_ari"] = scores(labels[labelled], parent.clusterer.assign(mu_old).cluster)["ari"]
        manifest = {
            **built.manifest,
            "kind": args.kind,
            "version": args.version,
            "parent": parent.manifest.get("version") if parent is not None else None,
            "next_cluster_id": next_id,
            "gate_metrics": metrics,
            "ranks": shard.world if shard is not None else 1,
            "data": {"store": str(store.path), "first_event": int(ids[0]), "last_event": int(ids[-1])},
        }
        out = Path(args.state) / "models" / f"v{args.version}"
        write_version(out, pack(built.model, built.clusterer, features, "recordings", manifest), replace=True)
        if shard is not None:
            ddp.leave()
        del np  # numpy only used through the store
        return {"path": str(out), "version": args.version, "kind": args.kind, "metrics": metrics}
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.train.trainer", description=__doc__)
    ap.add_argument("--state", required=True)
    ap.add_argument("--version", type=int, required=True)
    ap.add_argument("--kind", choices=KINDS, required=True)
    ap.add_argument("--parent", default="")
    ap.add_argument("--parent-pid", type=int, default=0, help="the daemon: exit when it is gone")
    ap.add_argument("--config-file", required=True, help="the daemon's configuration, JSON")
    args = ap.parse_args(argv)
    tie_to_parent(args.parent_pid)
    try:
        from daemon.ops.config import from_dict

        cfg = from_dict(json.loads(Path(args.config_file).read_text()))  # the daemon's own, validated again
        lower_priority(cfg.training.idle, cfg.training.nice)
        done = run(args, cfg)
    except Exception as e:  # reported to the daemon, which logs, counts and backs off
        say("error", message=f"{type(e).__name__}: {e}"[:2000])
        return 1
    if done is not None:  # rank 0 (or the only process)
        say("done", **done, ranks=cfg.training.nproc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
