"""Training samples/s with one process and with N data-parallel ranks (torchrun; gloo on CPUs, NCCL on GPUs), by
data size: from what size data-parallel training pays on this small model.

    python bench/ddp.py [--sizes 1000 4000 16000] [--epochs 8] [--nproc 2] [--device cpu|cuda]

Events are the paper data's spectra (../shared/data), repeated where a size asks for more. Each size trains with
``wingbeat train --json`` (one process) and ``wingbeat train --nproc N --json``; samples/s is the training events
(90 % of the size) over the mean seconds per epoch. Prints figures and the ratio, same run, same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "dynamicbeta_synthetic_spectra.npz"

from model.spectra import FeatureConfig, featurise_spectra


def train(data: Path, out: Path, epochs: int, nproc: int, device: str) -> float:
    cmd = [sys.executable, "-m", "daemon.cli", "train", str(data), "--out", str(out), "--force", "--json"]
    cmd += ["--epochs", str(epochs), "--device", device, "--nproc", str(nproc)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600, check=True)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    rank0 = [x for x in lines if x.get("rank", 0) == 0][-1]
    return float(rank0["seconds_per_epoch"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with np.load(DATA, allow_pickle=False) as d:
        x = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
    print(f"{os.cpu_count()} CPUs; {args.epochs} epochs per run; device {args.device}; {args.nproc} ranks vs 1")
    print(f"{'events':>8} {'1 process':>14} {f'{args.nproc} ranks':>14} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            f = Path(tmp) / f"x{n}.npz"
            np.savez(f, features=x[np.arange(n) % len(x)], allow_pickle=False)
            one = train(f, Path(tmp) / "one", args.epochs, 1, args.device)
            many = train(f, Path(tmp) / "many", args.epochs, args.nproc, args.device)
            per = int(n * 0.9)  # the held-out tenth is not trained on
            print(f"{n:>8} {per / one:>10.0f} s⁻¹ {per / many:>10.0f} s⁻¹ {one / many:>6.2f}×")


if __name__ == "__main__":
    main()
