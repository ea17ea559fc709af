"""Wingbeat vs the paper's baselines on the reference data sets; prints ARI / AMI per seed.

Paper data: train on events 0–499 of each label, evaluate on events 500–999 of each label (5,500 each); the
model's own clusterer (fitted on the training latents) labels the evaluation events. ``refit_on_evaluation``:
the same kind of mixture fitted on the evaluation events' latents instead, the way the baselines are fitted on
the evaluation events' features.
Semi-supervised: labels of 7 of the 11 species in training; the other 4 are unlabelled and unseen as labels.
UCR InsectWingbeatSound: unsupervised on all 220 events, repeated over seeds.
Usage: python bench/headtohead.py [--epochs 1000] [--seeds 0 1 2] [--jobs 2] [--only paper|semi|ucr]
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

from model.build import build
from model.cluster import ClusterConfig, fit_clusterer
from model.evaluate import baselines, scores
from model.spectra import FeatureConfig, featurise_spectra, scale_features
from model.train import TrainConfig, encode_mu
from model.vae import VAEConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT = ("25Hz", "90Hz", "130Hz", "180Hz")  # labels hidden in the semi-supervised run


def paper_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    with np.load(DATA / "dynamicbeta_synthetic_spectra.npz", allow_pickle=False) as d:
        x = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
        y = d["label"]
    tr = np.concatenate([np.flatnonzero(y == s)[:500] for s in np.unique(y)])
    ev = np.concatenate([np.flatnonzero(y == s)[500:1000] for s in np.unique(y)])
    return x[tr], y[tr], x[ev], y[ev]


def job(kind: str, seed: int, epochs: int) -> dict[str, object]:
    torch.set_num_threads(1)
    if kind == "ucr":
        with np.load(DATA / "ucr_insectwingbeatsound_train.npz", allow_pickle=False) as d:
            xtr = scale_features(d["features"]).features
            ytr = d["label"]
        xev, yev = xtr, ytr
    else:
        xtr, ytr, xev, yev = paper_split()
    train_labels = np.where(np.isin(ytr, HELD_OUT), "", ytr) if kind == "semi" else np.full(len(ytr), "")
    cfg = TrainConfig(epochs=epochs, seed=seed, semi_supervised=kind == "semi")
    b = build(xtr, train_labels, VAEConfig(n_in=int(xtr[0].size)), cfg, ClusterConfig(seed=seed), torch.device("cpu"))
    mu, err = (t.double().numpy() for t in encode_mu(b.model, torch.from_numpy(xev.reshape(len(xev), -1))))
    pred = b.clusterer.assign(mu, err).cluster
    out: dict[str, object] = {"kind": kind, "seed": seed, "k": b.clusterer.k, **scores(yev, pred)}
    # the same mixture fitted on the evaluation events' latents, as the baselines are fitted on their features
    refit = fit_clusterer(mu, err, ClusterConfig(seed=seed))
    out["refit_on_evaluation"] = {"k": refit.k, **scores(yev, refit.assign(mu, err).cluster)}
    if kind == "semi":
        unseen = np.isin(yev, HELD_OUT)
        out["unseen_species"] = scores(yev[unseen], pred[unseen])
    out["seconds_per_epoch"] = float(np.mean(b.manifest["history"]["seconds"]))
    out["selected_epoch"] = b.result.selected_epoch
    out["final_beta"] = b.result.schedule.beta
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", choices=["paper", "semi", "ucr"], nargs="*", default=["paper", "semi", "ucr"])
    args = ap.parse_args()
    tasks = [(k, s, args.epochs) for k in args.only for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(job, *t) for t in tasks]
        if "paper" in args.only or "semi" in args.only:
            _, _, xev, yev = paper_split()
            print("paper baselines (evaluation events):", json.dumps(baselines(xev, yev)), flush=True)
        if "ucr" in args.only:
            with np.load(DATA / "ucr_insectwingbeatsound_train.npz", allow_pickle=False) as d:
                print(
                    "ucr baselines:",
                    json.dumps(baselines(scale_features(d["features"]).features, d["label"])),
                    flush=True,
                )
        for f in futures:
            print(json.dumps(f.result()), flush=True)


if __name__ == "__main__":
    main()
