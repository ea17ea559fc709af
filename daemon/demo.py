"""``make demo``: the offline pipeline end to end on embedded defaults — simulate, train, evaluate, plot."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys
from pathlib import Path

from daemon.cli import app

OUT = Path("out/demo")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    data, model, png = OUT / "simulated.npz", OUT / "model", OUT / "wingbeat.png"
    steps = [
        ["simulate", "--out", str(data), "--events", "3000", "--species", "6", "--seed", "0"],
        ["train", str(data), "--out", str(model), "--epochs", "300", "--force"],
        ["evaluate", str(model), str(data), "--baselines"],
        ["plot", str(model), str(data), "--out", str(png)],
    ]
    for argv in steps:
        print("$ wingbeat " + " ".join(argv), flush=True)
        try:
            app(argv, standalone_mode=False)
        except SystemExit as e:
            if e.code:
                sys.exit(e.code)
    print(f"\nThe picture is at {png.resolve()}")


if __name__ == "__main__":
    main()
