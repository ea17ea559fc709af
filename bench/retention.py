"""Serving with the store at its raw-sample limit, against an earlier build, both measured in this run.

    python bench/retention.py [--baseline REV] [--rounds 3] [--raw-max-mb 32]

A store that keeps raw samples up to ``store.raw_max_bytes`` reaches that limit and from then on drops the oldest
samples as fast as new ones arrive (``daemon.store.retention``). Each round starts a fresh daemon of each build
(order alternating) with a small limit and measures, as ``bench/throughput.py`` does (same sender, model and
events): sustained acked events/s while the store fills past the limit, send → publish latency at ``--rate``
while retention runs throughout, and sustained events/s at the limit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from throughput import BASELINE, Bench, extract, ms, snapshot, wingbeat

FIGURES = (
    ("sustained", "sustained acked durable events/s, filling past the limit", True),
    ("p50", "p50 latency at the fixed rate, at the limit, ms", False),
    ("p99", "p99 latency at the fixed rate, at the limit, ms", False),
    ("max", "largest latency at the fixed rate, at the limit, ms", False),
    ("sustained_limit", "sustained acked durable events/s at the limit", True),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--raw-max-mb", type=int, default=32, help="store.raw_max_bytes in MiB (4,000 events: ~100)")
    ap.add_argument("--window", type=int, default=2048, help="unacked events in flight per sender")
    args = ap.parse_args()
    args.long, args.trainer_share = 0, 0.0
    work = Path(tempfile.mkdtemp(prefix="wingbeat-retention-"))
    try:
        builds = {"current": snapshot(work / "current-tree"), "baseline": extract(args.baseline, work / "base-tree")}
        data, model = work / "events.npz", work / "model"
        sim = ("simulate", "--out", str(data), "--events", str(args.events), "--species", "6", "--seed", "3")
        wingbeat(builds["current"], *sim)
        wingbeat(builds["current"], "train", str(data), "--out", str(model), "--epochs", "20")
        bench = Bench(args, work, data, model)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
        for r in range(args.rounds):
            for name in list(builds) if r % 2 == 0 else list(builds)[::-1]:
                daemon, eps = bench.start_daemon(f"{name}-{r}", builds[name], args.raw_max_mb << 20)
                try:
                    got = {"sustained": bench.sustained(eps, "fill")}
                    lat = bench.latency(eps, "fixed")
                    got |= {"p50": ms(lat, 50), "p99": ms(lat, 99), "max": ms(lat, 100)}
                    got["sustained_limit"] = bench.sustained(eps, "at-limit")
                finally:
                    daemon.terminate()
                    daemon.wait(60)
                runs[name].append(got)
                print(f"round {r} {name:8s} " + "  ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
        print(f"\n{'figure':56s} {'current':>22s} {'baseline':>22s} {'better by':>10s}")
        for key, title, higher in FIGURES:
            cur, base = (np.median([g[key] for g in runs[n]]) for n in builds)
            each = {n: "/".join(f"{g[key]:.0f}" for g in runs[n]) for n in builds}
            ratio = cur / base if higher else base / cur
            print(
                f"{title:56s} {cur:7.1f} ({each['current']:>12s}) {base:7.1f} ({each['baseline']:>12s}) {ratio:9.2f}×"
            )
        print("(median of the rounds, each round's figure in brackets; 'better by': current over baseline, ×)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
