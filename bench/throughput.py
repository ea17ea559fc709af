"""Daemon throughput and latency, with the sender in its own process; the featurise-only loop as the ceiling.

    python bench/throughput.py [--events 4000] [--rate 500] [--long 0]

1. featurise-only: ``featurise_events`` over the same events in batches of 256, one thread (the ceiling);
2. sustained: a sender process pushes every event as fast as acks allow (``--window`` unacked events in
   flight, 2048 by default); acked events/s;
3. latency at a fixed rate: send → publish, measured by a subscriber here against the send time stamped in
   ``t0_ns`` by the sender (same clock); p50 / p99;
4. the same two while a training runs in the background (on the CPU, resting to ``training.cpu_share`` of a core:
   ``--trainer-share 1`` lets it take every idle cycle);
5. ``--long N``: N more events, RSS of the daemon at start and end.
Events: 2 channels, int16, 0.1–0.5 s at 20.8 kHz, from the simulator. Prints figures and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
TRAINER_SHARE = 0.0  # --trainer-share: training.cpu_share of the daemon under test (0 = its default)
sys.path.insert(0, str(ROOT))

from daemon.data.datasets import read_recordings
from model.spectra import FeatureConfig, featurise_events

SENDER = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.protocol import Event
from pathlib import Path
rec = read_recordings(Path(sys.argv[2]))
endpoint, rate, sensor, start, repeat = sys.argv[3], float(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7])
def stamped():
    seq = start
    for _ in range(repeat):
        for e in events_of(rec, sensor, 0, False):
            e.seq = seq; seq += 1
            e.t0_ns = time.time_ns()  # send time: the subscriber measures latency against it
            yield e
res = replay(stamped(), endpoint, rate=rate, window=int(sys.argv[8]), ack_timeout_s=30, give_up_s=120)
print(json.dumps(res.to_dict()))
"""


WINDOW = 2048  # events in flight per sender (--window)


def send(data: Path, endpoint: str, rate: float, sensor: str, start: int, repeat: int = 1) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", SENDER, str(ROOT), str(data), endpoint, str(rate), sensor, str(start), str(repeat)]
    args.append(str(WINDOW))
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen[str], timeout: float = 900) -> dict:
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def wingbeat(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "daemon.cli", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def latency_run(data: Path, eps: dict, rate: float, sensor: str, n: int) -> tuple[dict, np.ndarray]:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, f"cluster.{sensor}".encode())
    sub.connect(eps["publish"])
    time.sleep(0.5)
    p = send(data, eps["ingest"], rate, sensor, 0)
    lat = []
    deadline = time.monotonic() + n / max(rate, 1) + 120
    while len(lat) < n and time.monotonic() < deadline:
        if sub.poll(1000):
            now = time.time_ns()
            body = json.loads(sub.recv_multipart()[1])
            lat.append((now - body["t0_ns"]) / 1e9)
    sub.close(linger=0)
    return finish(p), np.array(lat)


def start_daemon(work: Path, name: str, model: Path, threads: int | None) -> tuple[subprocess.Popen[bytes], dict]:
    """A daemon serving ``model``; ``threads``: ingest.featurise_threads (None = the default)."""
    conf = work / f"{name}.toml"
    conf.write_text(
        '[ingest]\nendpoint = "tcp://127.0.0.1:0"\n'
        + ("" if threads is None else f"featurise_threads = {threads}\n")
        + '[publish]\nendpoint = "tcp://127.0.0.1:0"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[store]\nraw_max_bytes = 268435456\n'
        "[training]\nfinetune_every_events = 100000000\nfull_every_events = 100000000\nfinetune_every_s = 0.0\n"
        "epochs_full = 300\n" + (f"cpu_share = {TRAINER_SHARE}\n" if TRAINER_SHARE else "")
    )
    state = work / f"{name}-state"
    log = open(work / f"{name}.log", "w")
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon.cli",
            "run",
            "--config",
            str(conf),
            "--state",
            str(state),
            "--model",
            str(model),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 60
    while not (state / "endpoints.json").exists() and time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}; see {work / f'{name}.log'}")
        time.sleep(0.2)
    return daemon, json.loads((state / "endpoints.json").read_text())


def stop_daemon(daemon: subprocess.Popen[bytes]) -> None:
    daemon.terminate()
    daemon.wait(60)


def sustained_and_latency(data: Path, eps: dict, rate: float, n: int, tag: str) -> tuple[dict, np.ndarray]:
    res = finish(send(data, eps["ingest"], 0, f"max{tag}", 0))
    res_lat, lat = latency_run(data, eps, rate, f"fixed{tag}", n)
    if len(lat) < n or res_lat["acked"] < n:
        print(f"  (only {len(lat)} outputs and {res_lat['acked']} acks of {n} at the fixed rate)")
    return res, lat


def ms(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q) * 1e3)


def main() -> None:
    global WINDOW
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--window", type=int, default=WINDOW, help="unacked events in flight per sender")
    ap.add_argument("--long", type=int, default=0, help="events of the memory run (0 = skip)")
    ap.add_argument("--trainer-share", type=float, default=0.0, help="training.cpu_share (0 = the default)")
    args = ap.parse_args()
    global TRAINER_SHARE
    TRAINER_SHARE = args.trainer_share
    WINDOW = args.window
    work = Path(tempfile.mkdtemp(prefix="wingbeat-bench-"))
    data = work / "events.npz"
    wingbeat("simulate", "--out", str(data), "--events", str(args.events), "--species", "6", "--seed", "3")
    rec = read_recordings(data)
    events = [rec.event(i) for i in range(len(rec))]
    mean_s = np.mean([e.shape[1] for e in events]) / rec.fs[0]
    print(f"{len(events)} events, 2 × int16, mean {mean_s:.2f} s at {rec.fs[0]:g} Hz; sender window {WINDOW}")

    # 1. the ceiling
    cfg = FeatureConfig()
    t = time.perf_counter()
    for i in range(0, len(events), 256):
        featurise_events(events[i : i + 256], rec.fs[i : i + 256], cfg)
    ceiling = len(events) / (time.perf_counter() - t)
    print(f"featurise-only loop (1 thread):          {ceiling:8.0f} events/s")

    # a model, so that every event is published
    model = work / "model"
    wingbeat("train", str(data), "--out", str(model), "--epochs", "20")

    # the baseline in the same run: one thread does everything (ingest.featurise_threads = 0)
    daemon, eps = start_daemon(work, "serial", model, threads=0)
    try:
        base, base_lat = sustained_and_latency(data, eps, args.rate, len(events), "")
    finally:
        stop_daemon(daemon)

    daemon, eps = start_daemon(work, "daemon", model, threads=None)
    try:
        rss0 = rss_mib(daemon.pid)
        # 2. and 3. sustained, and latency at a fixed rate
        res, lat = sustained_and_latency(data, eps, args.rate, len(events), "")
        print(
            f"sustained acked durable events/s:        {res['events_per_s']:8.0f}   "
            f"({res['events_per_s'] / ceiling:.2f} × the featurise-only ceiling; {res['acked']} acked, "
            f"{res['resent']} resent)"
        )
        print(
            f"  the same, one-thread loop (baseline):  {base['events_per_s']:8.0f}   "
            f"(featurise threads / baseline: {res['events_per_s'] / base['events_per_s']:.2f}×)"
        )
        print(
            f"latency at {args.rate:.0f} events/s (send → publish):  p50 {ms(lat, 50):6.1f} ms   "
            f"p99 {ms(lat, 99):6.1f} ms   ({len(lat)} outputs, {res['acked']} acked)"
        )
        print(
            f"  the same, one-thread loop (baseline):  p50 {ms(base_lat, 50):6.1f} ms   p99 {ms(base_lat, 99):6.1f} ms"
        )

        # 4. while a training runs
        state = work / "daemon-state"
        (state / "retrain-request").touch()
        time.sleep(4)
        res = finish(send(data, eps["ingest"], 0, "max-train", 0))
        print(f"sustained while training:                {res['events_per_s']:8.0f}   events/s")
        res, lat = latency_run(data, eps, args.rate, "fixed-train", len(events))
        print(
            f"latency at {args.rate:.0f} events/s while training:     p50 {ms(lat, 50):6.1f} ms   "
            f"p99 {ms(lat, 99):6.1f} ms"
        )

        # 5. memory over a long replay
        if args.long:
            rss1 = rss_mib(daemon.pid)
            t = time.monotonic()
            res = finish(send(data, eps["ingest"], 0, "long", 0, repeat=max(1, args.long // len(events))), 3600)
            print(
                f"long replay: {res['acked']} events in {time.monotonic() - t:.0f} s; daemon RSS at start "
                f"{rss0:.0f} MiB, before the long replay {rss1:.0f} MiB, after {rss_mib(daemon.pid):.0f} MiB"
            )
    finally:
        stop_daemon(daemon)
    print(f"(work directory: {work})")


if __name__ == "__main__":
    main()
