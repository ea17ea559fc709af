"""The bounds script (``bench/ceiling.py``): its mixture started at the truth, and its rows on known answers."""

import importlib.util
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score

spec = importlib.util.spec_from_file_location("ceiling", Path(__file__).resolve().parents[1] / "bench" / "ceiling.py")
assert spec is not None and spec.loader is not None
ceiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ceiling)

SPECIES = ("5Hz", "25Hz", "80Hz", "90Hz", "100Hz", "120Hz", "130Hz", "160Hz", "180Hz", "200Hz", "500Hz")


def test_em_from_truth_keeps_separated_classes_and_cannot_split_identical_ones():
    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], 200)
    apart = rng.normal(size=(600, 3)) + np.repeat(np.eye(3) * 20, 200, axis=0)
    assert adjusted_rand_score(y, ceiling.em_from_truth(apart, y, apart)) == 1.0
    same = rng.normal(size=(600, 3))  # three labels, one distribution: no mixture can tell them apart
    assert abs(adjusted_rand_score(y, ceiling.em_from_truth(same, y, same))) < 0.02


def test_bounds_reach_one_on_separated_species_except_the_closed_set_classifier():
    rng = np.random.default_rng(1)
    y = np.repeat(SPECIES, 120)
    centres = rng.normal(size=(len(SPECIES), 30)) * 10
    x = (np.repeat(centres, 120, axis=0) + rng.normal(size=(len(y), 30))).astype(np.float32)
    split = ceiling.split_per_label(y, 120)
    found = ceiling.bounds(x, y, split, seeds=[0, 1])
    rows = {r["method"]: r for r in found}
    closed = rows.pop("logistic regression on the 7 labelled species (the other 4 go to their neighbours)")
    for method, r in rows.items():
        assert min(r["report"]["ari"]) > 0.99, method
        assert len(r["report"]["ari"]) == (2 if "told K" in method else 1), method  # one per seed, or no seed
    # the 4 never-labelled species must land in labelled ones, so even separated species cannot all be found
    assert max(closed["report"]["ari"]) < 0.8
    lines = ceiling.table(found)
    assert lines[0].startswith("| given | method |") and len(lines) == 2 + 18
