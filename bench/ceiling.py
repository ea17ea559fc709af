"""How far the paper data's spectral shapes allow any clustering to go: bounds beside the protocol's targets.

The protocol (``bench/headtohead.py``) asks, on the paper data, for a mean ARI of at least 0.50 without labels and
0.60 with the labels of 7 species. This script measures what methods that are *given more than Wingbeat is* reach
on the same features and the same split, so that a target can be read against what the data holds:

- a classifier told every label (logistic regression on the 193 bins), for scale;
- a full Gaussian mixture and k-means told K = 11 on the features' leading principal components (seeds 0–4), and
  the same mixture fitted by EM from the true species' means and covariances: the best partition a mixture of
  this data converges to when its start is perfect;
- the projection that separates the species best, LDA fitted with the labels (all 11, or the 7 the
  semi-supervised run sees), then clustered without them, told K = 11 (a GMM and k-means, seeds 0–4);
- semi-supervised, a classifier of the 7 labelled species on all 193 bins, the other 4 species falling to their
  neighbours, as a closed-set classifier must let them.

Everything is fitted on the training events (0–499 of each label) and scored on the choose (500–749) and report
(750–999) events. Nothing here chooses a setting of Wingbeat. The features are Wingbeat's own
(``featurise_spectra``), as the protocol's baselines use them.
Usage: python bench/ceiling.py [--seeds 0 1 2 3 4] [--per-label 1000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture

sys.path.insert(0, str(Path(__file__).resolve().parent))
from headtohead import CHOOSE, HELD_OUT, REPORT, TRAIN, paper_data, split_per_label

from model.evaluate import scores

K = 11
PARTS = (("choose", CHOOSE), ("report", REPORT))


def em_from_truth(z_train: np.ndarray, y_train: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Labels of z from a full Gaussian mixture fitted by EM on z_train, started at each class's mean and
    covariance (equal weights). Deterministic: the start is the truth, not a draw."""
    classes = np.unique(y_train)
    means = np.array([z_train[y_train == c].mean(0) for c in classes])
    ridge = 1e-6 * np.eye(z.shape[1])
    precisions = np.array([np.linalg.inv(np.cov(z_train[y_train == c].T) + ridge) for c in classes])
    gm = GaussianMixture(
        len(classes),
        covariance_type="full",
        weights_init=np.full(len(classes), 1 / len(classes)),
        means_init=means,
        precisions_init=precisions,
        reg_covar=1e-6,
        max_iter=500,
    )
    return gm.fit(z_train).predict(z)


def told_k(z_train: np.ndarray, z: np.ndarray, k: int, seed: int) -> dict[str, np.ndarray]:
    """Labels of z from a full GMM and from k-means, each told k and fitted on z_train with one seed."""
    return {
        "gmm": GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-6).fit(z_train).predict(z),
        "kmeans": KMeans(k, n_init=10, random_state=seed).fit(z_train).predict(z),
    }


def bounds(x: np.ndarray, y: np.ndarray, split: np.ndarray, seeds: list[int]) -> list[dict[str, Any]]:
    """Rows of {"group", "method", "choose" / "report": {"ari": [one per seed], "ami": [...]}} for a set split like
    the paper data; methods without a seed have one entry."""
    x = x.reshape(len(x), -1).astype(np.float64)
    train = split == TRAIN
    seen = train & ~np.isin(y, HELD_OUT)
    rows: list[dict[str, Any]] = []

    def add(group: str, method: str, runs: list[np.ndarray]) -> None:
        row: dict[str, Any] = {"group": group, "method": method}
        for name, part in PARTS:
            got = [scores(y[split == part], p[split == part]) for p in runs]
            row[name] = {m: [g[m] for g in got] for m in ("ari", "ami")}
        rows.append(row)

    def clustered(group: str, projection: str, z: np.ndarray) -> None:
        fits = [told_k(z[train], z, K, s) for s in seeds]
        for algo, name in (("gmm", "GMM"), ("kmeans", "k-means")):
            add(group, f"{projection}, {name} told K = {K}", [f[algo] for f in fits])

    full = LogisticRegression(max_iter=3000).fit(x[train], y[train])
    add("told every label", "logistic regression on the 193 bins", [full.predict(x)])
    for dims in (4, 10, 20):
        z = PCA(dims, random_state=0).fit(x[train]).transform(x)
        clustered("no labels", f"PCA({dims})", z)
        add("the true species as a start", f"PCA({dims}), full GMM by EM", [em_from_truth(z[train], y[train], z)])
    for dims in (4, 10):
        z = LinearDiscriminantAnalysis(n_components=dims).fit(x[train], y[train]).transform(x)
        clustered("projection told every label, clustered without", f"LDA({dims}) of the 11 species", z)
    z = LinearDiscriminantAnalysis().fit(x[seen], y[seen]).transform(x)  # 7 species: 6 dimensions
    clustered("7 species labelled", "LDA(6) of the 7 labelled species", z)
    add(
        "7 species labelled",
        "LDA(6) of the 7 labelled species, EM started at all 11 true species",
        [em_from_truth(z[train], y[train], z)],
    )
    closed = LogisticRegression(max_iter=3000).fit(x[seen], y[seen])
    add(
        "7 species labelled",
        "logistic regression on the 7 labelled species (the other 4 go to their neighbours)",
        [closed.predict(x)],
    )
    return rows


def cell(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.3f}" if np.ptp(v) == 0 else f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| given | method | ARI choose | ARI report | AMI report |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['group']} | {r['method']} | {cell(r['choose']['ari'])} | {cell(r['report']['ari'])} "
            f"| {cell(r['report']['ami'])} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--per-label", type=int, default=1000, help="use the first N events of each label (a quick run)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not 48 <= args.per_label <= 1000:
        ap.error("--per-label must be 48-1000: each species' covariance in PCA(20) needs over 20 training events")
    x, y, split = paper_data()
    if args.per_label < 1000:
        split = split_per_label(y, args.per_label)
        keep = split >= 0
        x, y, split = x[keep], y[keep], split[keep]
    rows = bounds(x, y, split, args.seeds)
    print(f"paper data, {args.per_label} events a label; seeds {', '.join(map(str, args.seeds))} (mean [min, max])")
    print("\n".join(table(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
