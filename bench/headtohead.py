"""The quality protocol: Wingbeat against the simple methods an ecologist already has, chosen and reported apart.

Paper data (``dynamicbeta_synthetic_spectra.npz``), per label: events 0–499 train, 500–749 **choose** (every
setting of the project was chosen on these), 750–999 **report** (no choice looked at them). The model's own
clusterer, fitted on the training events' latents, labels the choose and report events; Wingbeat finds the number
of clusters itself. Baselines are fitted on the very events they are scored on and are told K where they need it:
PCA(2)+GMM by BIC, PCA(10)+GMM by BIC, Ward K = 11, k-means K = 11.
Semi-supervised: the labels of 7 species in training; 25, 90, 130 and 180 Hz are never labelled (``HELD_OUT``);
ARI/AMI over all 11 and over those 4 alone.
Simulated recordings (``daemon.data.simulate``): 250 events per species, 4–12 species, one or two wavelengths, split
per label like the paper data (first half train, next quarter choose, last quarter report).
UCR InsectWingbeatSound (220 real events, 11 classes): unsupervised on all 220, against Ward and k-means told K.

Seeds 0–4 by default; the table gives mean [min, max] over seeds on the report events (and, apart, the choose
events). Usage: python bench/headtohead.py [--seeds 0 1 2 3 4] [--jobs 2] [--only paper semi sim ucr]
[--epochs 1000] [--latents DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from sklearn.cluster import AgglomerativeClustering, KMeans

from model.build import build
from model.cluster import ClusterConfig
from model.evaluate import pca_gmm, scores
from model.spectra import FeatureConfig, featurise_events, featurise_spectra, scale_features
from model.train import MIN_STEPS, TrainConfig, batch_size_for, encode_mu, restarts_for
from model.vae import VAEConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT = ("25Hz", "90Hz", "130Hz", "180Hz")  # labels never given in the semi-supervised run
TRAIN, CHOOSE, REPORT = 0, 1, 2
SIM = ((4, 2), (6, 1), (8, 2), (10, 1), (12, 2))  # (species, wavelengths); the sim seed is the run's seed
SIM_PER_SPECIES = 250
KINDS = ("paper", "semi", "sim", "ucr")


def split_per_label(labels: np.ndarray, n: int) -> np.ndarray:
    """(events,) TRAIN / CHOOSE / REPORT: per label, the first n/2 events, the next n/4, the next n/4."""
    split = np.full(len(labels), -1)
    for s in np.unique(labels):
        idx = np.flatnonzero(labels == s)[:n]
        cut = (len(idx) // 2, (3 * len(idx)) // 4)
        split[idx[: cut[0]]], split[idx[cut[0] : cut[1]]], split[idx[cut[1] :]] = TRAIN, CHOOSE, REPORT
    return split


def paper_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features (events, 1, 193), labels, split."""
    with np.load(DATA / "dynamicbeta_synthetic_spectra.npz", allow_pickle=False) as d:
        x = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
        y = d["label"]
    return x, y, split_per_label(y, 1000)


def sim_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Simulated recordings of the seed's configuration in ``SIM``, featurised like the daemon does."""
    from daemon.data.simulate import SimConfig, simulate

    species, channels = SIM[seed % len(SIM)]
    d = simulate(SimConfig(events=SIM_PER_SPECIES * species, species=species, channels=channels, seed=seed))
    offsets, ch = d["offsets"], d["channels"]
    events = [d["samples"][offsets[i] : offsets[i + 1]].reshape(ch[i], -1) for i in range(len(ch))]
    x = featurise_events(events, d["fs"], FeatureConfig()).features
    return x, d["label"], split_per_label(d["label"], len(ch)), f"{species} species, {channels} wavelengths"


def ucr_data() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA / "ucr_insectwingbeatsound_train.npz", allow_pickle=False) as d:
        return scale_features(d["features"]).features, d["label"]


def baselines(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """The simple methods on the events they are scored on; Ward and k-means are told K."""
    x = x.reshape(len(x), -1).astype(np.float64)
    k = len(np.unique(y))
    return {
        "pca2_gmm": scores(y, pca_gmm(x, 2, seed)),
        "pca10_gmm": scores(y, pca_gmm(x, 10, seed)),
        "ward": scores(y, AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)),
        "kmeans": scores(y, KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)),
    }


def train_config(n_train: int, seed: int, epochs: int, semi: bool, select: str = "best") -> TrainConfig:
    """What ``wingbeat train`` does: the project's defaults, the batch rule for small sets (``batch_size_for``: 32
    over 220 events, 7 optimiser steps an epoch instead of 1), at least ``MIN_STEPS`` optimiser steps, and three
    restarts for sets under 500 events (``restarts_for``: UCR's 220)."""
    return TrainConfig(
        epochs=epochs,
        seed=seed,
        semi_supervised=semi,
        batch_size=batch_size_for(n_train),
        min_steps=MIN_STEPS,  # as `wingbeat train` does
        restarts=restarts_for(n_train),
        select=select,
    )


def job(kind: str, seed: int, epochs: int, latents: str | None, select: str, cut: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"kind": kind, "seed": seed}
    if kind == "ucr":
        x, y = ucr_data()
        split = np.full(len(y), REPORT)  # unsupervised on all 220: trained and scored on the same events
        train = np.ones(len(y), dtype=bool)
    elif kind == "sim":
        x, y, split, out["data"] = sim_data(seed)
        train = split == TRAIN
    else:
        x, y, split = paper_data()
        train = split == TRAIN
    labels = np.where(np.isin(y[train], HELD_OUT), "", y[train]) if kind == "semi" else np.full(train.sum(), "")
    cfg = train_config(int(train.sum()), seed, epochs, kind == "semi", select)
    cluster_cfg = ClusterConfig(seed=seed, split_silhouette=cut)  # not `split`: the events' split
    b = build(x[train], labels, VAEConfig(n_in=int(x[0].size)), cfg, cluster_cfg, torch.device("cpu"))
    mu, err = (t.double().numpy() for t in encode_mu(b.model, torch.from_numpy(x.reshape(len(x), -1))))
    pred = b.clusterer.assign(mu, err).cluster
    out["k"] = b.clusterer.k
    for name, part in (("choose", CHOOSE), ("report", REPORT)):
        rows = split == part
        if not rows.any():
            continue
        out[name] = {"wingbeat": scores(y[rows], pred[rows]), **baselines(x[rows], y[rows], seed)}
        if kind in ("paper", "semi"):  # the 4 species the semi-supervised run never sees labelled
            unseen = rows & np.isin(y, HELD_OUT)
            out[name]["wingbeat_unlabelled_4"] = scores(y[unseen], pred[unseen])
    out["selected_epoch"] = b.result.selected_epoch
    if len(b.manifest["restarts"]["seeds"]) > 1:
        out["restarts"] = b.manifest["restarts"]
    out["final_beta"] = b.result.schedule.beta
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if latents:  # for work on the clustering step without retraining
        np.savez(Path(latents) / f"{kind}_{seed}.npz", mu=mu, err=err, label=y, split=split, pred=pred)
    return out


def table(results: list[dict[str, Any]], part: str) -> list[str]:
    """Mean [min, max] over seeds per data set and method."""
    lines = []
    for kind in KINDS:
        runs = [r for r in results if r["kind"] == kind and part in r]
        if not runs:
            continue
        lines.append(f"{kind} ({part} events, {len(runs)} seeds: {', '.join(str(r['seed']) for r in runs)})")
        lines.append(f"  {'method':<24} {'ARI mean [min, max]':<24} {'AMI mean [min, max]':<24}")
        for method in runs[0][part]:
            cells = []
            for metric in ("ari", "ami"):
                v = np.array([r[part][method][metric] for r in runs])
                cells.append(f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]")
            lines.append(f"  {method:<24} {cells[0]:<24} {cells[1]:<24}")
        lines.append("  " + targets(runs, part, results))
    return lines


def targets(runs: list[dict[str, Any]], part: str, results: list[dict[str, Any]]) -> str:
    """Wingbeat above every baseline on every seed, in ARI and AMI; for the paper data also the mean and spread;
    semi-supervised: the mean over all 11 species, and the 4 never-labelled species against the unsupervised run
    of the same seed."""
    if runs[0]["kind"] == "semi":
        ari = np.array([r[part]["wingbeat"]["ari"] for r in runs])
        txt = f"mean ARI ≥ 0.60: {'yes' if ari.mean() >= 0.6 else 'no'}"
        plain = {r["seed"]: r[part] for r in results if r["kind"] == "paper" and part in r}
        pairs = [
            (r[part]["wingbeat_unlabelled_4"]["ari"], plain[r["seed"]]["wingbeat_unlabelled_4"]["ari"])
            for r in runs
            if r["seed"] in plain and "wingbeat_unlabelled_4" in plain[r["seed"]]
        ]
        if pairs:
            held = sum(a >= b for a, b in pairs)
            txt += f"; the 4 never-labelled species not below the unsupervised model: {held} of {len(pairs)} seeds"
            txt += " (" + ", ".join(f"{a:.3f} vs {b:.3f}" for a, b in pairs) + ")"
        return txt
    # UCR: the target is Ward and k-means (told K); on the others every baseline
    rivals = ("ward", "kmeans") if runs[0]["kind"] == "ucr" else ("pca2_gmm", "pca10_gmm", "ward", "kmeans")
    won = all(r[part]["wingbeat"][m] > r[part][b][m] for r in runs for b in rivals for m in ("ari", "ami"))
    ari = np.array([r[part]["wingbeat"]["ari"] for r in runs])
    txt = f"above {', '.join(rivals)} on every seed (ARI and AMI): {'yes' if won else 'no'}"
    if runs[0]["kind"] == "paper":
        txt += f"; mean ARI ≥ 0.50: {'yes' if ari.mean() >= 0.5 else 'no'}"
        txt += f"; worst seed within 0.03 of the mean: {'yes' if ari.mean() - ari.min() <= 0.03 else 'no'}"
    return txt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", choices=KINDS, nargs="+", default=list(KINDS))
    ap.add_argument("--select", choices=("best", "cluster"), default="best", help="kept epoch (TrainConfig.select)")
    ap.add_argument("--split", type=float, default=0.0, help="ClusterConfig.split_silhouette (0: Ward's one cut)")
    ap.add_argument("--latents", help="folder to save each run's latents, errors, labels and split (.npz)")
    ap.add_argument("--json", help="file to write every run's figures to")
    args = ap.parse_args()
    tasks = [(k, s, args.epochs, args.latents, args.select, args.split) for k in args.only for s in args.seeds]
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for r in pool.map(job, *zip(*tasks, strict=True)):
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print("\n".join(["", *table(results, "report"), "", "used to choose settings:", *table(results, "choose")]))


if __name__ == "__main__":
    main()
