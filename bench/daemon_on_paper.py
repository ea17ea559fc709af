"""The daemon's training rules on the paper data, which chose none of them.

Draws events at random from the paper data's 11,000 (``dynamicbeta_synthetic_spectra.npz``, 11 species) and trains
as the daemon's trainer does (``bench/diversity.py``'s ``train_scenario``): ``daemon``, the first model (the first
600 events of the draw, ``training.epochs_first`` epochs, ``training.first_restarts`` trainings, the most agreeing
kept), or ``retrain``, a full retrain (every event of the draw, ``training.epochs_full`` epochs, one training).
Prints one JSON object per draw: K and ARI (over every event of the draw) for the held-out ELBO's epoch with Ward's
one cut, the clustering criterion's epoch with the split (the daemon's rule before density), and the held-out
ELBO's epoch with groups by density in the features, split again (the daemon's rule), beside PCA(2)+GMM fitted on
the training events. About 40 s a first-model draw and 60 s a retrain draw on one core.

Usage: python bench/daemon_on_paper.py [--scenario daemon|retrain] [--draws 0 1 2 3 4] [--events 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import sklearn.metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diversity as D

from daemon.ops.config import Training
from model.cluster import ClusterConfig
from model.spectra import FeatureConfig, featurise_spectra

DATA = D.ROOT.parent / "shared" / "data" / "dynamicbeta_synthetic_spectra.npz"
RULES = {  # name: (clusterer, kept epoch)
    "ward/elbo": (ClusterConfig(), "elbo"),
    "ward+split/cluster": (ClusterConfig(split_silhouette=D.SPLIT_SILHOUETTE), "cluster"),
    "density+split/elbo": (D.METHODS["density+split"], "elbo"),
}


def draw(scenario: str, index: int, events: int, x_all: np.ndarray, y_all: np.ndarray) -> dict:
    rng = np.random.default_rng(1000 + index)
    pick = rng.choice(len(x_all), events, replace=False)
    x, y = x_all[pick], y_all[pick]
    s = D.Setting(seed=10_000 + index)
    runs = [
        D.train_scenario(x, scenario, s, r) for r in range(Training().first_restarts if scenario == "daemon" else 1)
    ]
    n = int(runs[0]["n_train"])
    out: dict = {"scenario": scenario, "draw": index, "events": events, "n_train": n, "species": len(set(y[:n]))}
    for name, (cfg, select) in RULES.items():
        k, pred, epoch, _ = D.kept_model(runs, cfg, select, s.seed, D.clusterer_seed(scenario, s.seed), x)
        out[name] = {"k": k, "ari": round(float(sklearn.metrics.adjusted_rand_score(y, pred)), 3), "epoch": epoch}
    base = D.baseline(x, n, 2, s.seed)
    out["pca2_gmm"] = {"k": len(set(base[:n])), "ari": round(float(sklearn.metrics.adjusted_rand_score(y, base)), 3)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=["daemon", "retrain"], default="daemon")
    p.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--events", type=int, help="events a draw (default 2,000 for daemon, 3,000 for retrain)")
    a = p.parse_args()
    with np.load(DATA, allow_pickle=False) as d:
        x_all = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
        y_all = d["label"]
    rows = [draw(a.scenario, i, a.events or (2000 if a.scenario == "daemon" else 3000), x_all, y_all) for i in a.draws]
    for r in rows:
        print(json.dumps(r), flush=True)
    for name in (*RULES, "pca2_gmm"):
        ari = np.array([r[name]["ari"] for r in rows])
        print(
            f"{name:20} ARI mean {ari.mean():.3f} [{ari.min():.3f}, {ari.max():.3f}]  K {[r[name]['k'] for r in rows]}"
        )


if __name__ == "__main__":
    main()
