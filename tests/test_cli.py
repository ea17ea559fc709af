"""The ``wingbeat`` command end to end, as a user runs it: real processes, real files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WINGBEAT = [sys.executable, "-m", "daemon.cli"]


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*WINGBEAT, *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "sim.npz"
    run("simulate", "--out", str(out), "--events", "300", "--species", "3", "--seed", "2", "--labelled-fraction", "0.8")
    return out


def test_simulate_writes_a_valid_recordings_set(sim):
    with np.load(sim, allow_pickle=False) as d:
        n = len(d["channels"])
        assert n == 300 and d["samples"].dtype == np.int16 and d["offsets"][-1] == len(d["samples"])
        assert set(d["channels"].tolist()) == {2} and (d["fs"] == 20_800).all()
        lengths = np.diff(d["offsets"]) // 2
        assert lengths.min() >= 0.1 * 20_800 and lengths.max() <= 0.5 * 20_800
        labels = set(d["label"].tolist())
        assert "" in labels and len(labels - {""}) == 3
        assert (np.diff(d["t0_ns"]) > 0).all()


@pytest.mark.slow
def test_train_evaluate_plot(sim, tmp_path):
    model = tmp_path / "m"
    p = run("train", str(sim), "--out", str(model), "--epochs", "30", "--json", "--seed", "3")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 30 and summary["events"] == 300
    assert summary["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # what --device auto picks
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["data"]["kind"] == "recordings" and len(manifest["history"]["beta"]) == 30
    # --epochs given: exactly those, no step floor; the small set's batch rule (300 events → 32)
    assert manifest["train"]["min_steps"] == 0 and manifest["train"]["batch_size"] == 32
    assert manifest["restarts"]["seeds"] == [3]  # nor restarts, although the set is small
    p = run("evaluate", str(model), str(sim), "--baselines", "--json")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    with np.load(sim, allow_pickle=False) as d:
        assert res["n_events"] == (d["label"] != "").sum()  # every labelled event, only those
    assert set(res) >= {"ari", "ami", "n_clusters", "n_events", "baselines"}
    assert set(res["baselines"]) == {"hca_ward", "pca_gmm", "kmeans"}
    assert all(set(v) == {"ari", "ami"} for v in res["baselines"].values())
    png = tmp_path / "p.png"
    run("plot", str(model), str(sim), "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = run("train", str(sim), "--out", str(model), "--epochs", "2", ok=False)
    assert p.returncode == 2 and "already exists" in p.stderr


def test_train_with_restarts_keeps_one_and_says_which(sim, tmp_path):
    model = tmp_path / "m"
    p = run("train", str(sim), "--out", str(model), "--epochs", "3", "--restarts", "2", "--seed", "5", "--json")
    r = json.loads(p.stdout.strip().splitlines()[-1])["restarts"]
    assert r["seeds"] == [5, 100_008] and r["kept"] in (0, 1) and len(r["agreement"]) == 2
    assert f"kept restart {r['kept'] + 1} of 2 (seed {r['seeds'][r['kept']]}" in p.stderr
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["train"]["restarts"] == 2 and manifest["train"]["seed"] == 5 and manifest["restarts"] == r
    assert len(manifest["history"]["beta"]) == 3  # the kept training's epochs
    p = run("train", str(sim), "--out", str(tmp_path / "n"), "--restarts", "0", ok=False)
    assert p.returncode == 2 and "--restarts" in p.stderr


def test_train_keeps_the_epoch_and_cuts_as_told(sim, tmp_path):
    model = tmp_path / "m"
    args = ("--epochs", "40", "--seed", "3", "--json")
    p = run("train", str(sim), "--out", str(model), "--select", "cluster", "--split", "0.65", *args)
    kept = json.loads(p.stdout.strip().splitlines()[-1])["selected_epoch"]
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["train"]["select"] == "cluster" and manifest["cluster"]["split_silhouette"] == 0.65
    # the clustering criterion's candidates: every 10th epoch after the warm-up (25 epochs), and the last
    assert manifest["train"]["beta"]["warmup"] == 25 and kept in (29, 39)
    # the daemon's cut of a new model: groups by density in the features, split again in the latent
    last = tmp_path / "last"
    p = run(
        "train", str(sim), "--out", str(last), "--select", "last", "--clusters", "density", "--split", "0.65", *args
    )
    assert json.loads(p.stdout.strip().splitlines()[-1])["selected_epoch"] == 39
    cut = json.loads((last / "manifest.json").read_text())["cluster"]
    assert (cut["method"], cut["split_silhouette"], cut["density_dims"]) == ("density", 0.65, 20)
    for bad, says in ((("--split", "1.5"), "--split"), (("--clusters", "dp", "--split", "0.5"), "these are dp's")):
        p = run("train", str(sim), "--out", str(tmp_path / "bad"), *bad, ok=False)
        assert p.returncode == 2 and says in p.stderr and not (tmp_path / "bad").exists()


@pytest.mark.gpu
@pytest.mark.slow
def test_train_on_cuda_gives_the_cpu_model_within_rounding(sim, tmp_path):
    """Same data and seed on both devices: the same model, up to float32 rounding.

    Initial weights, the validation split, batch order and the reparameterisation noise all come from CPU
    generators on both devices, so the two trainings take the same steps; only the arithmetic differs (cuBLAS
    sums in another order: ~1e-6 relative per operation), and 20 epochs of Adam amplify that a little. Hence:
    the same epoch kept; latent means within 0.05 (5 % of the prior's standard deviation, far below the distance
    between clusters); cluster assignments agree up to events on a boundary (ARI ≥ 0.95 between the two).
    """
    from daemon.data.datasets import load_dataset
    from daemon.store.versions import read_version
    from model.evaluate import scores
    from model.predict import predict
    from model.spectra import FeatureConfig

    summaries, predictions = {}, {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        p = run("train", str(sim), "--out", str(out), "--epochs", "20", "--seed", "3", "--device", device, "--json")
        summaries[device] = json.loads(p.stdout.strip().splitlines()[-1])
        assert summaries[device]["device"] == device
        version = read_version(out)  # loaded on the CPU: both evaluated by the same arithmetic
        predictions[device] = predict(version, load_dataset(sim, FeatureConfig()).features)
    assert summaries["cuda"]["selected_epoch"] == summaries["cpu"]["selected_epoch"]
    cpu, cuda = predictions["cpu"], predictions["cuda"]
    np.testing.assert_allclose(cuda.latent, cpu.latent, rtol=0, atol=0.05)
    assert scores(cpu.cluster, cuda.cluster)["ari"] >= 0.95


def bad(tmp_path: Path, name: str, **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_bad_inputs_end_with_one_clear_line(tmp_path):
    cases = {
        "missing": (tmp_path / "nope.npz", "no such file"),
        "nonsense": (bad(tmp_path, "k.npz", foo=np.ones(3)), "not a Wingbeat data set"),
        "pickled": (bad(tmp_path, "p.npz", features=np.array([{"a": 1}], dtype=object)), "pickled objects"),
        "shape": (bad(tmp_path, "s.npz", features=np.ones((4, 10), np.float32)), "(events, channels, bins)"),
        "nan": (
            bad(tmp_path, "n.npz", spectra=np.full((2, 1, 193), np.nan, np.float32), freqs=np.arange(193) * 10.4),
            "event 0",
        ),
        "offsets": (
            bad(
                tmp_path,
                "o.npz",
                samples=np.ones(10, np.int16),
                offsets=np.array([0, 4, 9]),
                channels=np.array([1, 1]),
                fs=np.array([2e4, 2e4]),
            ),
            "'offsets' must rise",
        ),
        "labels": (bad(tmp_path, "l.npz", features=np.ones((2, 1, 5), np.float32), label=np.array([1, 2])), "'label'"),
    }
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip")
    cases["garbage"] = (tmp_path / "garbage.npz", "not a readable .npz")
    for name, (path, message) in cases.items():
        p = run("train", str(path), "--out", str(tmp_path / f"m-{name}"), "--epochs", "1", ok=False)
        assert p.returncode == 2, (name, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
        assert message in p.stderr, (name, p.stderr)
        assert not (tmp_path / f"m-{name}").exists()


def test_unknown_model_directory(tmp_path, sim):
    p = run("evaluate", str(tmp_path / "none"), str(sim), ok=False)
    assert p.returncode == 2 and "no such model directory" in p.stderr and "Traceback" not in p.stderr
