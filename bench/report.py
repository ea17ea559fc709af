"""Time ``wingbeat report`` (and ``wingbeat export``) on a store of many events.

    python bench/report.py [--events 100000] [--stations 3] [--days 14] [--clusters 8] [--state DIR] [--json FILE]

The store is written quickly through the Store API (``ingest_pooled`` and ``add_outputs``: a centre's store, so the
page has every section, the station comparison too) with fake outputs of one model version: each cluster has its
own share of the events and its own hour of peak activity, and a manifest with cluster cards. No model is trained
and no daemon runs: what is timed is the command alone, as a user runs it (``python -m daemon.cli report``, a
fresh process: its start-up, the store read, the figures and the page), best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.protocol import Output, Pooled
from daemon.store.db import Store

START = 1_780_272_000 * 10**9  # 2026-06-01T00:00:00Z
HOUR = 3_600 * 10**9
BATCH = 5_000


def build(state: Path, events: int, stations: int, days: int, clusters: int, seed: int = 0) -> float:
    """Write the store and the model version's manifest; return the seconds it took."""
    t = time.monotonic()
    rng = np.random.default_rng(seed)
    share = rng.dirichlet(np.ones(clusters))
    peak = rng.integers(0, 24, clusters)
    cluster = rng.choice(clusters, events, p=share)
    cluster[rng.random(events) < 0.02] = -1  # novel
    hour = (peak[np.maximum(cluster, 0)] + rng.normal(0, 2.5, events)).round().astype(np.int64) % 24
    t0 = START + (rng.integers(0, days, events) * 24 + hour) * HOUR + rng.integers(0, HOUR, events)
    station = rng.integers(0, stations, events)
    features = np.zeros(2 * 193, np.float32).tobytes()
    store = Store(state)
    try:
        for lo in range(0, events, BATCH):
            part = range(lo, min(events, lo + BATCH))
            pooled = [
                Pooled(f"st{station[i]}", "trap", i, int(t0[i]), 20_800.0, "int16", 2, 4096, "", {"n": i}, features,
                       None)
                for i in part
            ]  # fmt: skip
            ids = store.ingest_pooled(pooled, [])
            store.add_outputs(
                [
                    Output(eid, "trap", i, int(t0[i]), 1, int(cluster[i]), 0.9, 0.1, 0.01, tuple(rng.normal(size=4)))
                    for eid, i in zip(ids, part, strict=True)
                ]
            )
        store.record_model(1, "serving", "full", {})
    finally:
        store.close()
    freqs = np.arange(193) * 10.4
    cards = []
    for c in range(clusters):
        f0 = 150.0 + 60.0 * c
        mean = 0.1 + 0.8 * np.exp(-0.5 * ((freqs[None] - f0 * np.array([[1], [2]])) / 15) ** 2)
        cards.append(
            {"cluster": c, "size": int((cluster == c).sum()), "f0_hz": f0, "f0_iqr_hz": [f0 - 10, f0 + 10],
             "f0_of_mean_hz": f0, "harmonics": [1.0, 0.6, 0.3, 0.1], "mean_spectrum": mean.round(4).tolist(),
             "species": {}}
        )  # fmt: skip
    v = state / "models" / "v1"
    v.mkdir(parents=True, exist_ok=True)
    (v / "manifest.json").write_text(json.dumps({"features": {"f_max": 2000.0, "df": 10.4}, "cards": cards}))
    return time.monotonic() - t


def timed(*args: str) -> tuple[float, str]:
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"wingbeat {args[0]} failed: {r.stderr}")
    return time.monotonic() - t, r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--stations", type=int, default=3)
    ap.add_argument("--days", type=int, default=14)
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--state", type=Path, help="Keep the store here (default: a temporary directory).")
    ap.add_argument("--json", type=Path, help="Also write the figures to this file.")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = a.state or Path(tmp) / "state"
        built = build(state, a.events, a.stations, a.days, a.clusters)
        what = f"{a.events} events ({a.stations} stations, {a.days} days, {a.clusters} clusters)"
        print(f"store of {what} in {built:.1f} s")
        out = Path(tmp) / "report.html"
        runs = [timed("report", "--state", str(state), "--out", str(out)) for _ in range(a.repeat)]
        best = min(s for s, _ in runs)
        print(f"wingbeat report: best {best:.1f} s of {[round(s, 1) for s, _ in runs]} ({runs[-1][1]}); "
              f"page {out.stat().st_size / 1e3:.0f} kB")  # fmt: skip
        parquet, _ = timed("export", "--state", str(state), "--out", str(Path(tmp) / "o.parquet"))
        dwca, _ = timed("export", "--state", str(state), "--format", "dwca", "--out", str(Path(tmp) / "o.zip"))
        print(f"wingbeat export: parquet {parquet:.1f} s, dwca {dwca:.1f} s")
        result = {"events": a.events, "report_s": round(best, 2), "report_runs_s": [round(s, 2) for s, _ in runs],
                  "page_kb": round(out.stat().st_size / 1e3), "export_parquet_s": round(parquet, 2),
                  "export_dwca_s": round(dwca, 2)}  # fmt: skip
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
