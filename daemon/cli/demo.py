"""``wingbeat demo`` (and ``make demo``): the daemon on embedded defaults, fed by a simulated instrument.

Starts ``wingbeat run`` in a throw-away state directory on free loopback ports, sends a simulated labelled
night of insects through the reference sender at a steady rate, and prints once a second what an operator
watches: events per second, trainings and model versions with β, clusters and their sizes. Then ARI/AMI of the
published clusters against the simulated species, and where the plot, the metrics and the logs are. Ends with what
an ecologist reads: per UTC day of event time, the Hill numbers of the served clusters beside those of the simulated
species (the truth), and the estimated richness with its interval.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon.cli.clients import ReplayResult, events_of, replay
from daemon.data.datasets import read_recordings

DAY_NS = 86_400 * 10**9

CONFIG = """
[ingest]
endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[training]
first_after = {first}
epochs_first = 150
first_restarts = 1
finetune_every_events = {every}
epochs_finetune = 40
full_every_events = 1000000
finetune_every_s = 0.0
"""


def run_demo(events: int = 4000, species: int = 6, rate: float = 200.0, labelled: float = 0.1, days: int = 3) -> int:
    """A deployment of ``days`` UTC days whose community changes by day (species appear and vanish), ``events``
    insects of ``species`` species in all, sent at ``rate`` events per second (s⁻¹)."""
    root = Path(tempfile.mkdtemp(prefix="wingbeat-demo-"))
    py = [sys.executable, "-m", "daemon.cli"]
    print(f"Wingbeat demo in {root}", flush=True)
    truth_file, sent_file = root / "truth.npz", root / "instrument.npz"
    sim = ["--events", str(events), "--species", str(species), "--seed", "0", "--days", str(days)]
    subprocess.run(
        [*py, "simulate", "--out", str(truth_file), *sim, "--community", "changing"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with np.load(truth_file, allow_pickle=False) as d:
        data = dict(d)
    truth = data["label"].copy()
    keep = np.random.default_rng(0).random(len(truth)) < labelled  # calibration recordings carry a label
    data["label"] = np.where(keep, truth, "")
    np.savez(sent_file, allow_pickle=False, **data)
    print(
        f"simulated {len(truth)} events of {len(set(truth.tolist()))} species over {days} UTC days of event time "
        f"(truth: {truth_file.with_suffix('.truth.json')}); {keep.sum()} of them labelled (calibration)",
        flush=True,
    )
    conf = root / "wingbeat.toml"
    conf.write_text(CONFIG.format(first=events // 3, every=events // 3))
    state = root / "state"
    log_path = root / "daemon.log"
    log = open(log_path, "w")
    daemon = subprocess.Popen(
        [*py, "run", "--config", str(conf), "--state", str(state)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while not (state / "endpoints.json").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print(log_path.read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        eps = json.loads((state / "endpoints.json").read_text())
        print(
            f"daemon up: ingest {eps['ingest']}, publish {eps['publish']}, metrics http://{eps['metrics']}/metrics",
            flush=True,
        )
        code = _watch(root, eps, sent_file, truth, rate, log_path, state)
        if code == 0:
            _diversity_table(state, data["t0_ns"], truth, root)
        return code
    finally:
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()


def _watch(
    root: Path, eps: dict[str, str], sent_file: Path, truth: np.ndarray, rate: float, log_path: Path, state: Path
) -> int:
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"cluster.")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(eps["publish"])
    time.sleep(0.3)
    rec = read_recordings(sent_file)
    result: dict[str, ReplayResult] = {}
    acked = [0]

    def on_ack(body: dict[str, Any], _: float) -> None:
        acked[0] += 1

    sender = threading.Thread(
        target=lambda: result.setdefault(
            "r", replay(events_of(rec, "demo-trap", 0, False), eps["ingest"], rate=rate, on_ack=on_ack)
        ),
        daemon=True,
    )
    start = time.monotonic()
    sender.start()
    latest: dict[int, dict[str, Any]] = {}  # seq → last output (a resent output replaces the earlier one)
    log_pos = 0
    last_print, last_acked = start, 0
    patience = time.monotonic() + 900
    training = [False]  # a training runs: the demo waits for its model before the final score
    while (len(latest) < len(rec) or sender.is_alive() or training[0]) and time.monotonic() < patience:
        while sub.poll(50):
            body = json.loads(sub.recv_multipart()[1])
            latest[body["seq"]] = body
        with open(log_path) as f:
            f.seek(log_pos)
            lines = f.readlines()
            log_pos = f.tell()
        for line in lines:
            _narrate(line, training)
        now = time.monotonic()
        if now - last_print >= 1.0:
            sizes = Counter(b["cluster"] for b in latest.values())
            top = " ".join(f"{k}:{v}" for k, v in sorted(sizes.items()))
            per_s = (acked[0] - last_acked) / (now - last_print)
            shown = top or "— (no model yet)"
            print(
                f"[{now - start:5.0f} s] acked {acked[0]:5d}/{len(rec)} ({per_s:4.0f} events/s)  "
                f"published {len(latest):5d}  clusters {shown}",
                flush=True,
            )
            last_print, last_acked = now, acked[0]
    sub.close(linger=0)
    r = result.get("r")
    if r is None or r.unacked:
        print("the sender did not get every event acknowledged", file=sys.stderr)
        return 1
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    seqs = np.array(sorted(latest))
    pred = np.array([latest[s]["cluster"] for s in seqs])
    ari, ami = adjusted_rand_score(truth[seqs], pred), adjusted_mutual_info_score(truth[seqs], pred)
    print(f"\nsent {r.sent}, acked {r.acked}, resent {r.resent}; {len(latest)} events published")
    print(
        f"published clusters vs the simulated species: ARI {ari:.3f}, AMI {ami:.3f} "
        f"({len(set(pred.tolist()))} clusters incl. −1 = novel, {len(set(truth.tolist()))} species)"
    )
    _offline_vs_served(state, sent_file, latest, truth)
    (root / "metrics.txt").write_bytes(urllib.request.urlopen(f"http://{eps['metrics']}/metrics", timeout=10).read())
    from daemon.store.db import Store

    store = Store(state, readonly=True)
    serving = next(m["version"] for m in store.models() if m["status"] == "serving")
    store.close()
    png = root / "wingbeat.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "plot",
            str(state / "models" / f"v{serving}"),
            str(sent_file),
            "--out",
            str(png),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"plot of model v{serving}: {png}")
    print(f"metrics snapshot: {root / 'metrics.txt'} (live at http://{eps['metrics']}/metrics while it ran)")
    print(f"daemon log (JSON lines): {log_path}; state: {state} (try: wingbeat status --state {state})")
    return 0


def _narrate(line: str, training: list[bool]) -> None:
    try:
        e = json.loads(line)
    except ValueError:
        return
    kind = e.get("event")
    training[0] = (training[0] or kind == "training_started") and kind not in (
        "model_serving",
        "model_rejected",
        "training_failed",
    )
    if kind == "training_started":
        print(
            f"  ▶ training v{e['model_version']} ({e['kind']}) on {e['events']} events, {e['epochs']} epochs",
            flush=True,
        )
    elif kind == "training_epoch" and (e["epoch"] % 50 == 0 or e["epoch"] == e["epochs"] - 1):
        print(
            f"    epoch {e['epoch']:4d}/{e['epochs']}  β {e['beta']:.3f}  γ {e['gamma']:.2f}  L_rec {e['rec']:.3f}"
            f"  L_KL {e['kl']:.3f}",
            flush=True,
        )
    elif kind == "model_serving":
        print(f"  ✔ model v{e['model_version']} serving: {e['clusters']} clusters, IDs {e['cluster_ids']}", flush=True)
    elif kind in ("model_rejected", "training_failed"):
        print(f"  ✘ model v{e['model_version']} {kind.split('_')[1]}: {e.get('reason') or e.get('error')}", flush=True)


def main() -> None:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(run_demo())


if __name__ == "__main__":
    main()


def _diversity_table(state: Path, t0_ns: np.ndarray, truth: np.ndarray, root: Path) -> None:
    """Per UTC day of event time: the Hill numbers of the clusters as the daemon served them (its store) beside
    those of the simulated species, and the richness estimated from the clusters (Chao1) with its 95 % interval.

    ``t0_ns`` (events,) int64 ns since the epoch and ``truth`` (events,) species names, in the order sent.
    """
    from daemon.report.windows import diversity_windows
    from model.diversity import observed

    served = {w["start"][:10]: w for w in diversity_windows(state, "day", as_served=True)}
    day_of = (np.asarray(t0_ns, np.int64) // DAY_NS).astype(np.int64)
    print("\ndiversity per UTC day of event time: clusters found by the daemon vs the simulated species (true)")
    print("  q0 = richness, q1 = exp(Shannon), q2 = inverse Simpson, in effective numbers of species, of the clusters")
    print("  present (from 50 events a day: at least 2 events and 0.5 % of them; fewer are strays);")
    print("  estimated q0 = Chao1 from every cluster found, with its 95 % bootstrap interval (reaching down to the")
    print("  clusters present: one below the floor may be strays or a rare species); novel events (−1) left out")
    print(f"{'':18}{'q0':^13}{'q1':^15}{'q2':^15}")
    pairs = f"{'found':>6} {'true':>5} {'found':>7} {'true':>6} {'found':>7} {'true':>6}"
    print(f"{'day':10} {'events':>6} {pairs}   estimated q0 [95 % CI]")
    for day in np.unique(day_of):
        name = datetime.fromtimestamp(int(day) * 86_400, UTC).date().isoformat()
        _, true_counts = np.unique(truth[day_of == day], return_counts=True)
        t = observed(true_counts)
        w = served.get(name)
        if w is None:  # nothing of that day in the store: the table says so rather than a row of zeros
            print(f"{name:10} {int((day_of == day).sum()):6d}   (no served events)")
            continue
        f, est, (lo, hi) = w["observed"], w["estimated"]["q0"], w["ci95"]["q0"]
        print(
            f"{name:10} {int((day_of == day).sum()):6d} {f['q0']:6.0f} {t['q0']:5.0f} {f['q1']:7.2f} {t['q1']:6.2f} "
            f"{f['q2']:7.2f} {t['q2']:6.2f}   {_num(est)} [{_num(lo)}, {_num(hi)}]"
        )
    print(f"more: wingbeat diversity --state {state} --by day")
    print(f"      wingbeat report --state {state} --out {root / 'report.html'}")


def _num(v: float | None) -> str:
    return "∞" if v is None else f"{v:.1f}"


def _offline_vs_served(state: Path, data: Path, latest: dict[int, dict[str, Any]], truth: np.ndarray) -> None:
    """No loss between offline and serving: the newest version's published clusters beside what
    ``wingbeat evaluate`` computes for the same version on the same events."""
    from sklearn.metrics import adjusted_rand_score

    from daemon.data.datasets import load_dataset
    from daemon.store.versions import read_version
    from model.predict import predict

    if not latest:
        return
    v = max(b["model_version"] for b in latest.values())
    seqs = np.array(sorted(s for s, b in latest.items() if b["model_version"] == v))
    version = read_version(state / "models" / f"v{v}")
    offline = predict(version, load_dataset(data, version.features).features[seqs]).cluster
    served = np.array([latest[s]["cluster"] for s in seqs])
    print(
        f"the {len(seqs)} events published by v{v}: ARI {adjusted_rand_score(truth[seqs], served):.3f}; "
        f"wingbeat evaluate of v{v} on the same events: ARI {adjusted_rand_score(truth[seqs], offline):.3f} "
        f"({np.mean(served == offline):.1%} in the same cluster)"
    )
