"""The quality protocol's own logic (``bench/headtohead.py``): its split and the verdicts it prints, on made-up runs."""

import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location(
    "headtohead", Path(__file__).resolve().parents[1] / "bench" / "headtohead.py"
)
assert spec is not None and spec.loader is not None
headtohead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(headtohead)


def test_split_per_label_halves_then_quarters_each_label():
    labels = np.array(["a"] * 8 + ["b"] * 4 + ["a"] * 4)  # label a has 12 events, b 4; n = 8 keeps a's first 8
    split = headtohead.split_per_label(labels, 8)
    t, c, r = headtohead.TRAIN, headtohead.CHOOSE, headtohead.REPORT
    assert split[:8].tolist() == [t] * 4 + [c] * 2 + [r] * 2
    assert split[8:12].tolist() == [t, t, c, r]
    assert (split[12:] == -1).all()  # beyond n events of the label: unused


def run(kind, seed, wingbeat, unlabelled=None, **baselines):
    part = {"wingbeat": {"ari": wingbeat[0], "ami": wingbeat[1]}}
    part |= {name: {"ari": v[0], "ami": v[1]} for name, v in baselines.items()}
    if unlabelled is not None:
        part["wingbeat_unlabelled_4"] = {"ari": unlabelled, "ami": unlabelled}
    return {"kind": kind, "seed": seed, "report": part}


def test_verdicts_need_every_seed_and_both_scores():
    base = {"pca2_gmm": (0.40, 0.60), "pca10_gmm": (0.40, 0.60), "ward": (0.40, 0.60), "kmeans": (0.40, 0.60)}
    runs = [run("paper", 0, (0.52, 0.70), 0.6, **base), run("paper", 1, (0.50, 0.70), 0.7, **base)]
    line = headtohead.targets(runs, "report", runs)
    assert "on every seed (ARI and AMI): yes" in line and "≥ 0.50: yes" in line and "0.03 of the mean: yes" in line
    runs[1]["report"]["wingbeat"]["ami"] = 0.59  # one seed, one score below one baseline
    runs[1]["report"]["wingbeat"]["ari"] = 0.44
    line = headtohead.targets(runs, "report", runs)
    assert "on every seed (ARI and AMI): no" in line and "≥ 0.50: no" in line and "0.03 of the mean: no" in line
    ucr = [run("ucr", 0, (0.30, 0.50), ward=(0.29, 0.49), kmeans=(0.28, 0.48), pca10_gmm=(0.9, 0.9))]
    assert "above ward, kmeans on every seed (ARI and AMI): yes" in headtohead.targets(ucr, "report", ucr)


def test_semi_supervised_verdict_compares_the_unlabelled_species_with_the_same_seeds_unsupervised_run():
    plain = [run("paper", 0, (0.45, 0.6), 0.60), run("paper", 1, (0.45, 0.6), 0.70)]
    semi = [run("semi", 0, (0.62, 0.7), 0.65), run("semi", 1, (0.60, 0.7), 0.69)]
    line = headtohead.targets(semi, "report", plain + semi)
    assert "mean ARI ≥ 0.60: yes" in line
    assert "not below the unsupervised model: 1 of 2 seeds (0.650 vs 0.600, 0.690 vs 0.700)" in line
