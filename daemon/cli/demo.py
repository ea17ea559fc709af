"""``wingbeat demo`` (and ``make demo``): the daemon on embedded defaults, fed by a simulated instrument.

Starts ``wingbeat run`` in a throw-away state directory on free loopback ports, sends a simulated labelled
night of insects through the reference sender at a steady rate, and prints once a second what an operator
watches: events per second, trainings and model versions with β, clusters and their sizes. Ends with ARI/AMI of
the published clusters against the simulated species, and where the plot, the metrics and the logs are.
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
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from daemon.cli.clients import ReplayResult, events_of, replay
from daemon.data.datasets import read_recordings

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
finetune_every_events = {every}
epochs_finetune = 40
full_every_events = 1000000
finetune_every_s = 0.0
"""


def run_demo(events: int = 4000, species: int = 6, rate: float = 200.0, labelled: float = 0.1) -> int:
    root = Path(tempfile.mkdtemp(prefix="wingbeat-demo-"))
    py = [sys.executable, "-m", "daemon.cli"]
    print(f"Wingbeat demo in {root}", flush=True)
    truth_file, sent_file = root / "truth.npz", root / "instrument.npz"
    subprocess.run(
        [*py, "simulate", "--out", str(truth_file), "--events", str(events), "--species", str(species), "--seed", "0"],
        check=True,
    )
    with np.load(truth_file, allow_pickle=False) as d:
        data = dict(d)
    truth = data["label"].copy()
    keep = np.random.default_rng(0).random(len(truth)) < labelled  # calibration recordings carry a label
    data["label"] = np.where(keep, truth, "")
    np.savez(sent_file, allow_pickle=False, **data)
    print(f"simulated {events} events of {species} species; {keep.sum()} of them labelled (calibration)", flush=True)
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
        return _watch(root, eps, sent_file, truth, rate, log_path, state)
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
