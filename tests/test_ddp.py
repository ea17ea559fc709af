"""Data-parallel training under torchrun on gloo (CPU): two ranks take the same β at every epoch, rank 0 writes
the version, and its clusters score within noise of the one-process model on the same data and epochs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ROOT, cli, simulate

from daemon.store.versions import read_version

pytestmark = pytest.mark.slow
EPOCHS = "150"


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 1000, 4, 3)


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_two_ranks_take_the_same_beta_and_match_one_process(tmp_path, sim):
    singles = []  # the noise: one-process models of three seeds on the same data and epochs
    for seed in ("0", "1", "2"):
        one = tmp_path / f"one{seed}"
        r = cli("train", str(sim), "--out", str(one), "--epochs", EPOCHS, "--seed", seed, "--json", timeout=600)
        assert r.returncode == 0, r.stderr
        singles.append(json_lines(r.stdout)[-1]["train_labelled"]["ari"])  # every simulated event is labelled

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "daemon.cli"]
    r = subprocess.run(
        [*cmd, "train", str(sim), "--out", str(two), "--epochs", EPOCHS, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = {s["rank"]: s for s in json_lines(r.stdout) if "rank" in s}
    assert sorted(ranks) == [0, 1] and ranks[0]["ranks"] == 2
    assert ranks[0]["beta_history"] == ranks[1]["beta_history"]  # decided on the summed losses, by every rank
    assert len(ranks[0]["beta_history"]) == int(EPOCHS)
    v = read_version(two)
    assert v.manifest["ranks"] == 2 and v.manifest["history"]["beta"] == ranks[0]["beta_history"]

    a2 = ranks[0]["train_labelled"]["ari"]
    print(f"ARI one process, seeds 0-2: {[round(a, 3) for a in singles]}; two ranks, seed 0: {a2:.3f}")
    assert min(singles) - 0.05 <= a2 <= max(singles) + 0.05  # within the spread of seeds


def test_nproc_launches_torchrun_itself(tmp_path, sim):
    out = tmp_path / "m"
    r = cli("train", str(sim), "--out", str(out), "--epochs", "5", "--nproc", "2", "--json", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_version(out).manifest["ranks"] == 2
    assert sorted(s["rank"] for s in json_lines(r.stdout) if "rank" in s) == [0, 1]
