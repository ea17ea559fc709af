"""The model's commands: ``simulate``, ``train``, ``evaluate`` and ``plot``: data sets and model versions, no
daemon."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.app import ClusterMethod, Device, Mode, Select, app, clean_errors, emit_json, pick_device, without_nproc
from daemon.cli.folders import LabelFrom, TimeFrom, audio_options, warn


@app.command()
@clean_errors
def simulate(
    out: Annotated[Path, typer.Option(help="Recordings data set to write (.npz).")],
    events: Annotated[
        int, typer.Option(min=1, help="Number of events (with --days: expected in the whole deployment).")
    ] = 2000,
    species: Annotated[
        int | None, typer.Option(min=1, help="Number of species (default 6; with --days drawn by the seed).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    labelled_fraction: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of events with a label.")] = 1.0,
    fs: Annotated[float, typer.Option(help="Sample rate in Hz.")] = 20_800.0,
    channels: Annotated[int, typer.Option(min=1, max=8, help="Wavelengths (channels).")] = 2,
    noise: Annotated[float, typer.Option(min=0.0, help="Sensor noise, standard deviation in ADC counts.")] = 30.0,
    days: Annotated[
        int,
        typer.Option(
            min=0,
            help="Simulate a deployment of this many UTC days from 2026-06-01, whose community changes by day, and "
            "write its truth beside OUT (OUT with .truth.json: per-day and overall true abundances and Hill "
            "numbers, the species table). 0 = one steady stream of events.",
        ),
    ] = 0,
    community: Annotated[
        str,
        typer.Option(
            help="With --days: 'stable' (every species every day, abundances drifting a little), 'changing' "
            "(species appear and vanish, abundances change by day) or 'volatile' (strong swings, more turnover); "
            'or a JSON object of fields overriding one, e.g. \'{"preset": "stable", "species": 8}\' (fields: '
            "species, species_min, species_max, f_min, f_max, min_spacing, sigma_base, sigma_day, sigma_total, "
            "turnover, width_min, width_max). The species table (count, wing-beat fundamentals, harmonics, diel "
            "activity) is drawn by the seed.",
        ),
    ] = "changing",
) -> None:
    """Write a recordings data set from a simulated optical insect sensor; with --days, a deployment and its truth."""
    import json
    from dataclasses import replace

    import numpy as np

    from daemon.data.simulate import SimConfig, community_from, simulate_deployment
    from daemon.data.simulate import simulate as run_sim

    truth = None
    if days:
        com = community_from(community)
        if species is not None:
            com = replace(com, species=species)
        cfg = SimConfig(
            events=events, seed=seed, labelled_fraction=labelled_fraction, fs=fs, channels=channels, noise=noise
        )
        data, truth = simulate_deployment(cfg, days, com)
    else:
        cfg = SimConfig(
            events=events,
            species=species or 6,
            seed=seed,
            labelled_fraction=labelled_fraction,
            fs=fs,
            channels=channels,
            noise=noise,
        )
        data = run_sim(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez_compressed(tmp, allow_pickle=False, **data)
    os.replace(tmp, out)
    n, n_lab = len(data["label"]), int((data["label"] != "").sum())
    k = len(truth["species"]) if truth is not None else cfg.species
    line = f"wrote {out}: {n} events, {k} species, {channels} channels at {fs:g} Hz, {n_lab} labelled"
    if truth is not None:
        path = truth_path(out)
        tmp_json = path.with_name(f".{path.name}.tmp")
        tmp_json.write_text(json.dumps(truth, indent=1) + "\n")
        os.replace(tmp_json, path)
        line += f", {days} days; truth in {path}"
    typer.echo(line)


def truth_path(data: Path) -> Path:
    """Where ``simulate --days`` writes the truth of the deployment in ``data``: beside it, ``.truth.json``."""
    return data.with_suffix(".truth.json")


@app.command()
@clean_errors
def train(
    data: Annotated[
        Path, typer.Argument(help="Data set (.npz): recordings, spectra or features; or a folder of WAV/FLAC files.")
    ],
    out: Annotated[Path, typer.Option(help="Model version directory to write.")],
    epochs: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Training epochs, exactly. Default 1000, and more for small sets: at least 15,000 optimiser steps "
            "(1000 with --reference).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed: same seed and data, same model.")] = 0,
    mode: Annotated[Mode, typer.Option(help="β: the dynamic rule, vanilla (β = 1), or fixed (--beta).")] = Mode.dynamic,
    beta: Annotated[float, typer.Option(min=0.0, help="β for --mode fixed.")] = 1.0,
    semi_supervised: Annotated[
        bool,
        typer.Option(help="Add the clustering loss on labelled events (the paper's spread ratio with --reference)."),
    ] = False,
    reference: Annotated[
        bool,
        typer.Option(
            help="Behave as the paper's published code: its β-rule quirks, ReLU, last epoch kept, its label loss."
        ),
    ] = False,
    latent_dim: Annotated[
        int | None, typer.Option(min=1, help="Latent dimensions (default 4; 2 with --reference).")
    ] = None,
    free_bits: Annotated[
        float | None,
        typer.Option(min=0.0, help="KL floor in nats per latent dimension (0 = off; default 1, 0 with --reference)."),
    ] = None,
    clusters: Annotated[
        ClusterMethod | None,
        typer.Option(
            help="How K is chosen: ward (Ward's hierarchy cut at the best silhouette), dp (Dirichlet-process "
            "mixture), bic, or density (groups by density in the features, the daemon's new models: give it "
            "--split 0.65 as the daemon does) (default ward; bic with --reference)."
        ),
    ] = None,
    select: Annotated[
        Select | None,
        typer.Option(
            help="Which epoch is kept: best (lowest held-out ELBO), cluster (the latent whose clusters are clearest, "
            "by silhouette) or last (default best; last with --reference)."
        ),
    ] = None,
    split: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Split a ward cluster again while its own best cut has at least this mean silhouette (density: "
            "only where one density group holds most of the events) (0: one cut; default 0).",
        ),
    ] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    threads: Annotated[int, typer.Option(min=1, help="CPU threads for torch.")] = 1,
    skip_bad: Annotated[
        bool, typer.Option(help="Leave out events that cannot be featurised instead of failing.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
    nproc: Annotated[
        int, typer.Option(min=1, help="Data-parallel ranks on this machine (torchrun; one per GPU with CUDA).")
    ] = 1,
    restarts: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train from this many seeds and keep the model whose clusters agree best with the others' "
            "(default: 3 for sets under 500 events when --epochs is not given, else 1; 1 with --reference).",
        ),
    ] = None,
    label_from: LabelFrom = None,
    time_from: TimeFrom = "mtime",
) -> None:
    """Train a dynamic β-VAE and its latent clusters; write a model version. Under ``torchrun`` (or with
    ``--nproc N``) every rank trains on its share of the events and rank 0 writes the version."""
    import torch

    from daemon.train import ddp

    if nproc > 1 and not ddp.under_torchrun():
        if out.exists() and not force:
            raise FileExistsError(f"{out} already exists (choose another --out, or --force to replace it)")
        raise typer.Exit(ddp.launch(nproc, ["daemon.cli", *without_nproc(sys.argv[1:])]))

    from daemon.data.datasets import load_dataset
    from daemon.store.versions import write_version
    from daemon.train.progress import EpochProgress
    from model.beta import BetaConfig, GammaConfig
    from model.build import build
    from model.checkpoint import pack
    from model.cluster import ClusterConfig
    from model.spectra import FeatureConfig
    from model.train import MIN_STEPS, TrainConfig, batch_size_for, restarts_for
    from model.vae import VAEConfig

    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (choose another --out, or --force to replace it)")
    method = (clusters or (ClusterMethod.bic if reference else ClusterMethod.ward)).value
    if split and method not in ("ward", "density"):  # before the data set is read
        raise ValueError(
            f"--split splits ward's or density's clusters, and these are {method}'s (give --clusters ward or density)"
        )
    cluster_cfg = ClusterConfig(method=method, seed=seed, split_silhouette=split or 0.0)
    torch.set_num_threads(threads)
    dev = pick_device(device)
    shard = ddp.join(dev.type == "cuda")
    if shard is not None:
        dev = ddp.local_device(dev.type == "cuda")
    feat_cfg = FeatureConfig()
    ds = load_dataset(data, feat_cfg, skip_bad=skip_bad, audio=audio_options(label_from, time_from), warn=warn)
    vae_cfg = VAEConfig(
        n_in=int(ds.features[0].size),
        latent_dim=latent_dim or (2 if reference else VAEConfig.latent_dim),
        activation="relu" if reference else "leaky_relu",
    )
    train_cfg = TrainConfig(
        epochs=epochs or TrainConfig.epochs,
        batch_size=TrainConfig.batch_size if reference else batch_size_for(len(ds.features)),
        min_steps=0 if (reference or epochs) else MIN_STEPS,  # epochs given: exactly those
        seed=seed,
        beta=BetaConfig(mode=mode.value, fixed=beta, reference=reference),
        gamma=GammaConfig.paper() if reference else GammaConfig(),
        semi_supervised=semi_supervised,
        select=select.value if select else ("last" if reference else "best"),
        free_bits=(0.0 if reference else TrainConfig.free_bits) if free_bits is None else free_bits,
        restarts=restarts or (1 if (reference or epochs) else restarts_for(len(ds.features))),
    )
    if semi_supervised and ds.labelled.sum() == 0:
        raise ValueError(f"--semi-supervised: {data} has no labelled events")
    rank = shard.rank if shard is not None else 0
    with EpochProgress(
        train_cfg.epochs_for(len(ds.features)) * train_cfg.restarts,
        enabled=sys.stderr.isatty() and not as_json and rank == 0,
    ) as progress:
        built = build(ds.features, ds.label, vae_cfg, train_cfg, cluster_cfg, dev, progress.update, shard=shard)
    manifest = {
        **built.manifest,
        "data": {"path": str(data), "sha256": ds.sha256, "kind": ds.kind, "skipped": len(ds.skipped)},
        "parent": None,
        "ranks": shard.world if shard is not None else 1,
    }
    if rank == 0:
        write_version(out, pack(built.model, built.clusterer, feat_cfg, ds.kind, manifest), replace=force)
    if shard is not None:
        ddp.leave()
    m = built.manifest
    summary = {
        "model": str(out),
        "events": m["n_events"],
        "epochs": m["epochs"],
        "selected_epoch": m["selected_epoch"],
        "beta": built.result.schedule.beta,
        "n_clusters": built.clusterer.k,
        "seconds_per_epoch": sum(m["history"]["seconds"]) / max(1, m["epochs"]),
        "recoveries": m["recoveries"],
        "restarts": m["restarts"],
        "device": str(dev),
        **({"train_labelled": m["metrics"]["train_labelled"]} if "train_labelled" in m["metrics"] else {}),
    }
    if shard is not None:  # every rank says what it did: the β trajectories must be the same
        summary |= {"rank": rank, "ranks": shard.world, "beta_history": m["history"]["beta"]}
        if rank != 0:
            if as_json:
                emit_json(summary)
            return
    typer.echo(
        f"wrote {out}: {summary['events']} events, {summary['epochs']} epochs "
        f"({summary['seconds_per_epoch']:.3f} s/epoch on {dev}), kept epoch {summary['selected_epoch']}, "
        f"final β {summary['beta']:.3g}, {summary['n_clusters']} clusters{_restarts_note(m['restarts'])}",
        err=as_json,
    )
    if as_json:
        emit_json(summary)


def _restarts_note(r: dict[str, Any]) -> str:
    """What ``wingbeat train`` says about its restarts (nothing for one training)."""
    if len(r["seeds"]) < 2:
        return ""
    agreement = ", ".join(f"{a:.2f}" for a in r["agreement"])
    return f"; kept restart {r['kept'] + 1} of {len(r['seeds'])} (seed {r['seeds'][r['kept']]}, agreement {agreement})"


@app.command()
@clean_errors
def evaluate(
    model_dir: Annotated[Path, typer.Argument(help="Model version directory.")],
    data: Annotated[Path, typer.Argument(help="Labelled data set (.npz), or a folder of WAV/FLAC files.")],
    baselines: Annotated[bool, typer.Option(help="Also run Ward, PCA(2)+GMM and k-means on the same events.")] = False,
    skip_bad: Annotated[bool, typer.Option(help="Leave out events that cannot be featurised.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object last.")] = False,
    label_from: LabelFrom = None,
    time_from: TimeFrom = "mtime",
) -> None:
    """ARI and AMI of the model's clusters against the labels of every labelled event."""
    from daemon.data.datasets import load_dataset
    from daemon.store.versions import read_version
    from model.evaluate import baselines as run_baselines
    from model.evaluate import scores
    from model.predict import predict

    version = read_version(model_dir)
    audio = audio_options(label_from, time_from)
    ds = load_dataset(data, version.features, skip_bad=skip_bad, audio=audio, warn=warn)
    keep = ds.labelled
    if keep.sum() < 2:
        raise ValueError(f"{data}: needs at least 2 labelled events to evaluate, has {int(keep.sum())}")
    x, y = ds.features[keep], ds.label[keep]
    pred = predict(version, x)
    result: dict[str, Any] = {
        **scores(y, pred.cluster),
        "n_clusters": len(set(pred.cluster.tolist()) - {-1}),
        "n_events": len(y),
        "n_novel": int((pred.cluster < 0).sum()),
    }
    typer.echo(
        f"{model_dir} on {data}: ARI {result['ari']:.3f}, AMI {result['ami']:.3f}, "
        f"{result['n_clusters']} clusters, {result['n_events']} labelled events ({result['n_novel']} novel)",
        err=as_json,
    )
    if baselines:
        result["baselines"] = run_baselines(x, y)
        for name, s in result["baselines"].items():
            typer.echo(f"  {name:<9} ARI {s['ari']:.3f}, AMI {s['ami']:.3f}", err=as_json)
    if as_json:
        emit_json(result)


@app.command()
@clean_errors
def plot(
    model_dir: Annotated[Path, typer.Argument(help="Model version directory.")],
    data: Annotated[
        Path | None, typer.Argument(help="Data set to place in the latent space (.npz, or a folder of WAV/FLAC).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Picture to write (.png).")] = Path("wingbeat.png"),
    skip_bad: Annotated[bool, typer.Option(help="Leave out events that cannot be featurised.")] = False,
    label_from: LabelFrom = None,
    time_from: TimeFrom = "mtime",
) -> None:
    """Latent space by cluster and label, β / γ / loss curves, spectra beside their reconstructions."""
    from daemon.data.datasets import load_dataset
    from daemon.report.plot import render
    from daemon.store.versions import read_version

    version = read_version(model_dir)
    audio = audio_options(label_from, time_from)
    ds = load_dataset(data, version.features, skip_bad, audio, warn) if data is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    render(version, ds.features if ds else None, ds.label if ds else None, out)
    typer.echo(f"wrote {out}")
