"""Seconds per epoch: Wingbeat's fit loop vs a reference-style loop (DataLoader over a per-item Dataset), and vs
the fit loop of an earlier build (``--baseline REV``: its ``model/train.py``, read with ``git show``).

Same data (the paper's demo spectra, 6,500 events as in the reference run), same model (ReLU, the paper's),
same threads, same batch size, β fixed; all timed in this run, in ``--rounds`` interleaved rounds (the machine's
load moves between minutes), after one untimed warm-up epoch (torch initialises lazily). Prints the median of
the rounds and the ratios.
Usage: python bench/train_speed.py [--epochs N] [--rounds R] [--threads T] [--device cpu|cuda] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import model.train as this_train
from model import losses
from model.beta import BetaConfig
from model.spectra import FeatureConfig, featurise_spectra
from model.vae import VAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dynamicbeta_synthetic_spectra.npz"
BASELINE = "8868303"  # the build before daemon/ moved into subpackages (model/train.py as it was then)


class PerItem(Dataset):
    def __init__(self, x: np.ndarray) -> None:
        self.x = torch.FloatTensor(x)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], torch.tensor(1)


def reference_epochs(model: VAE, x: np.ndarray, epochs: int, device: torch.device) -> float:
    loader = DataLoader(PerItem(x), batch_size=256, shuffle=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for data, _ in loader:
            data = data.to(device)
            opt.zero_grad()
            recon, mu, logvar = model(data)
            loss = losses.reconstruction(recon, data) + 0.5 * losses.kl_standard_normal(mu, logvar)
            loss.backward()
            opt.step()
            for p in model.parameters():  # the reference checks every weight for NaN after every step
                if torch.isnan(p).any():
                    raise RuntimeError("NaN")
    return (time.perf_counter() - t0) / epochs


def baseline_train(rev: str) -> ModuleType:
    """``model/train.py`` of ``rev`` as a module of its own (the rest of ``model`` is this build's)."""
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:model/train.py"], check=True, capture_output=True, text=True
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="wingbeat-train-")) / "train_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("model.train_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    shutil.rmtree(path.parent)  # loaded: the file is no longer needed
    return module


def fit_epochs(train: ModuleType, cfg: VAEConfig, x: np.ndarray, epochs: int, device: torch.device) -> float:
    """Seconds per epoch of ``train.fit`` (this build's or an earlier one's) from a fresh model."""
    torch.manual_seed(0)
    model = VAE(cfg).to(device)
    tcfg = train.TrainConfig(epochs=epochs, val_fraction=0.0, beta=BetaConfig(mode="fixed", fixed=0.5, warmup=0))
    xt = torch.from_numpy(x).to(device)
    t0 = time.perf_counter()
    train.fit(model, xt, tcfg)
    return (time.perf_counter() - t0) / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--events", type=int, default=6500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline", default=BASELINE, help="git revision whose fit loop to time too ('none': skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with np.load(DATA, allow_pickle=False) as d:
        feats = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
    x = feats.reshape(len(feats), -1)[np.random.default_rng(0).choice(len(feats), args.events, replace=False)]
    cfg = VAEConfig(n_in=x.shape[1], activation="relu")
    loops: dict[str, Callable[[], float]] = {
        "reference": lambda: reference_epochs(VAE(cfg).to(device), x, args.epochs, device),
        "wingbeat": lambda: fit_epochs(this_train, cfg, x, args.epochs, device),
    }
    if args.baseline != "none":
        old = baseline_train(args.baseline)
        loops["baseline"] = lambda: fit_epochs(old, cfg, x, args.epochs, device)
    fit_epochs(this_train, cfg, x, 1, device)  # warm-up: torch's lazy initialisation is timed in no loop
    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name in list(loops) if r % 2 == 0 else list(loops)[::-1]:
            torch.manual_seed(0)
            times[name].append(loops[name]())
    med = {name: statistics.median(t) for name, t in times.items()}
    each = {name: ", ".join(f"{v:.4f}" for v in t) for name, t in times.items()}
    print(
        f"device {device}, {args.threads} thread(s), {len(x)} events × {x.shape[1]} inputs, {args.epochs} epochs "
        f"each, {args.rounds} rounds interleaved (median; each round in brackets)"
    )
    print(f"reference-style loop (DataLoader, per-item Dataset): {med['reference']:.4f} s/epoch ({each['reference']})")
    if "baseline" in med:
        print(
            f"fit loop of {args.baseline} (the earlier build):        {med['baseline']:.4f} s/epoch "
            f"({each['baseline']})"
        )
    print(f"wingbeat fit loop (whole tensors on the device):     {med['wingbeat']:.4f} s/epoch ({each['wingbeat']})")
    # per round too: the two loops of one round ran in the same minute, so their ratio moves less than each figure
    for name, label in (("reference", "the reference loop"), ("baseline", f"{args.baseline}'s fit loop")):
        if name in med:
            rounds = ", ".join(f"{a / b:.2f}" for a, b in zip(times[name], times["wingbeat"], strict=True))
            print(f"speed-up over {label}: {med[name] / med['wingbeat']:.2f}× (per round: {rounds})")


if __name__ == "__main__":
    main()
