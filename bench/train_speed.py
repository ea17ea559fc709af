"""Seconds per epoch: Wingbeat's fit loop vs a reference-style loop (DataLoader over a per-item Dataset).

Same data (the paper's demo spectra, 6,500 events as in the reference run), same model (ReLU, the paper's),
same threads, same batch size, β fixed; both timed in this run. Prints figures and their ratio.
Usage: python bench/train_speed.py [--epochs N] [--threads T] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from model import losses
from model.beta import BetaConfig
from model.spectra import FeatureConfig, featurise_spectra
from model.train import TrainConfig, fit
from model.vae import VAE, VAEConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dynamicbeta_synthetic_spectra.npz"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--events", type=int, default=6500)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with np.load(DATA, allow_pickle=False) as d:
        feats = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
    x = feats.reshape(len(feats), -1)[np.random.default_rng(0).choice(len(feats), args.events, replace=False)]
    cfg = VAEConfig(n_in=x.shape[1], activation="relu")
    torch.manual_seed(0)
    ref = reference_epochs(VAE(cfg).to(device), x, args.epochs, device)
    torch.manual_seed(0)
    model = VAE(cfg).to(device)
    tcfg = TrainConfig(epochs=args.epochs, val_fraction=0.0, beta=BetaConfig(mode="fixed", fixed=0.5, warmup=0))
    t0 = time.perf_counter()
    fit(model, torch.from_numpy(x).to(device), tcfg)
    ours = (time.perf_counter() - t0) / args.epochs
    print(
        f"device {device}, {args.threads} thread(s), {len(x)} events × {x.shape[1]} inputs, {args.epochs} epochs each"
    )
    print(f"reference-style loop (DataLoader, per-item Dataset): {ref:.4f} s/epoch")
    print(f"wingbeat fit loop (whole tensors on the device):     {ours:.4f} s/epoch")
    print(f"speed-up: {ref / ours:.2f}×")


if __name__ == "__main__":
    main()
