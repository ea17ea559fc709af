"""How fast ``wingbeat diversity`` summarises a big store, and how fast history is re-labelled.

    python bench/diversity_speed.py [--events 10000000] [--relabel 200000] [--keep DIR [--reuse]]

1. A store of ``--events`` events (default ten million) is built in SQLite itself (a recursive CTE through the
   store's own schema: no Python loop per event): 60 days of one station, four sensors, 12 synthetic clusters of
   uneven abundance and 2 % novel events. Version 1 served the first 60 %, version 2 (serving) the rest, and
   version 2's re-labelling of the first 60 % is in ``labels``: the default report reads both.
   ``diversity_windows`` is timed by day and by hour, labelled by the serving version and ``as_served``.
2. Re-labelling: ``--relabel`` events (default 200,000) with the features of simulated recordings, served by
   version 1, are re-labelled by a small model trained here (``wingbeat train``, a few epochs) with
   ``daemon.serve.relabel.relabel``, in this process on one torch thread as the background process runs: events/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.store.db import DB_NAME, Store

T0 = 1_780_272_000 * 10**9  # 2026-06-01T00:00:00Z
SPAN_NS = 60 * 86_400 * 10**9


def build(state: Path, n: int) -> float:
    """``n`` events, outputs and labels as described above; seconds taken."""
    t = time.monotonic()
    Store(state).close()  # the schema, as the daemon makes it
    db = __import__("sqlite3").connect(state / DB_NAME, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-1000000")
    served_by_1 = int(n * 0.6)
    step = SPAN_NS // n
    # cluster: a skewed pick of 0…11 from a multiplicative hash of the ID; 2 % novel (−1)
    cluster = "CASE WHEN (i * 2654435761) % 100 < 2 THEN -1 ELSE ((i * 40503) % 4096) * ((i * 40503) % 4096) % 12 END"
    db.execute("BEGIN")
    db.execute(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
        " INSERT INTO events (id, station, sensor, seq, t0_ns, fs, dtype, channels, n_samples, received_ns)"
        " SELECT i, '', 'trap-' || (i % 4), i, ? + i * ?, 20800.0, 'int16', 2, 4000, 0 FROM s",
        (n, T0, step),
    )
    db.execute(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
        f" INSERT INTO outputs SELECT i, CASE WHEN i <= ? THEN 1 ELSE 2 END, {cluster}, 0.9, 0.1, 1.0, '[]', 1 FROM s",
        (n, served_by_1),
    )
    db.execute(
        "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?)"
        f" INSERT INTO labels SELECT 2, i, ({cluster} + 3) % 13 - 1 FROM s",
        (served_by_1,),
    )
    now = time.time_ns()
    db.execute("INSERT INTO models VALUES (1, 'retired', 'full', ?, '{}', ''), (2, 'serving', 'full', ?, '{}', '')",
               (now, now))  # fmt: skip
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    return time.monotonic() - t


def time_windows(state: Path) -> list[tuple[str, float, int]]:
    from daemon.report.windows import diversity_windows

    out = []
    for by, served in (("day", False), ("hour", False), ("day", True)):
        t = time.monotonic()
        windows = diversity_windows(state, by, as_served=served)
        out.append((f"by {by}{', as served' if served else ''}", time.monotonic() - t, len(windows)))
    return out


def wingbeat(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon.cli", *args], check=True, cwd=ROOT, capture_output=True)


def time_relabel(work: Path, n: int) -> tuple[float, int]:
    """(events/s, events) re-labelling ``n`` stored events with a small trained model."""
    import torch

    from daemon.data.datasets import read_recordings
    from daemon.serve.relabel import relabel
    from daemon.store.versions import read_version
    from model.spectra import featurise_events

    data, model_dir = work / "sim.npz", work / "model"
    wingbeat("simulate", "--out", str(data), "--events", "2000", "--species", "6", "--seed", "3")
    wingbeat("train", str(data), "--out", str(model_dir), "--epochs", "5")
    version = read_version(model_dir)
    rec = read_recordings(data)
    fb = featurise_events([rec.event(i) for i in range(len(rec.fs))], rec.fs, version.features)
    feats = fb.features[fb.ok].reshape(int(fb.ok.sum()), -1).astype(np.float32)
    state = work / "relabel-state"
    Store(state).close()
    db = __import__("sqlite3").connect(state / DB_NAME, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO events (id, station, sensor, seq, t0_ns, fs, dtype, channels, n_samples, received_ns)"
        " VALUES (?, '', 's', ?, ?, 20800.0, 'int16', 2, 4000, 0)",
        ((i, i, T0 + i) for i in range(1, n + 1)),
    )
    db.executemany(
        "INSERT INTO features VALUES (?, ?)", ((i, feats[i % len(feats)].tobytes()) for i in range(1, n + 1))
    )
    db.executemany("INSERT INTO outputs VALUES (?, 1, 0, 1.0, 0.0, 0.0, '[]', 1)", ((i,) for i in range(1, n + 1)))
    db.execute("COMMIT")
    db.close()
    torch.set_num_threads(1)
    store = Store(state)
    store.db.execute("PRAGMA synchronous=NORMAL")  # as the re-labelling process does
    t = time.monotonic()
    done = relabel(store, version, 2)
    seconds = time.monotonic() - t
    store.close()
    return done / seconds, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--relabel", type=int, default=200_000)
    ap.add_argument("--keep", type=Path, help="Build the stores here and keep them.")
    ap.add_argument("--reuse", action="store_true", help="Time the store kept in --keep again instead of building it.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        if args.events:
            state = work / "windows-state"
            if args.reuse and (state / DB_NAME).exists():
                size = (state / DB_NAME).stat().st_size / 2**30
                print(f"store kept in {state} reused ({size:.2f} GiB)")
            else:
                built = build(state, args.events)
                size = (state / DB_NAME).stat().st_size / 2**30
                print(f"store of {args.events:,} events built in {built:.1f} s ({size:.2f} GiB)")
            for what, seconds, windows in time_windows(state):
                print(f"diversity_windows {what:<20} {seconds:7.1f} s   {windows:5d} windows")
        if args.relabel:
            rate, done = time_relabel(work, args.relabel)
            print(f"re-labelling: {done:,} events at {rate:,.0f} events/s (one torch thread)")


if __name__ == "__main__":
    main()
