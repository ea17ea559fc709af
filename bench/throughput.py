"""Daemon throughput and latency against an earlier build, both measured in this run, rounds interleaved.

    python bench/throughput.py [--events 4000] [--repeat 1] [--rate 500] [--rounds 2] [--baseline REV | --baseline none]

The machine's load moves between minutes (a shared VM can swing ±20 % or more), so a figure alone says little;
the ratio to the earlier build, measured in the same minutes, says what a change did. ``--baseline REV`` (default
``8868303``, the build before the package layout) is extracted with ``git archive`` into a temporary directory
(nothing in this checkout or its ``.git`` changes) and its daemon runs from there (``python -m daemon.cli run``,
that tree first on ``sys.path``) with this interpreter, the same model, configuration, events and sender.

Each round starts a fresh daemon of each build (the order alternates from round to round) and measures:

1. sustained: a sender process pushes every event as fast as acks allow (``--window`` unacked events in flight,
   2048 by default; ``--repeat N`` sends them N times, so that the first batches weigh less); acked durable
   events/s (acked only after the commit, ``synchronous=FULL``);
2. latency at a fixed rate (``--rate``): send → publish, measured by a subscriber here against the send time the
   sender stamps in ``t0_ns`` (same clock); p50 / p99;
3. the same latency while a full retrain runs on the CPU in the background (the trainer resting to
   ``training.cpu_share`` of a core; ``--trainer-share 1`` lets it take every idle cycle), then sustained events/s
   while it still runs.

Before the rounds, the featurise-only loop (``featurise_events`` over the same events in batches of 256, one
thread) as the ceiling of one core, with Welch by shared blocks (this build) and by an FFT per segment (forced),
twice each, alternating. ``--long N``: after the rounds, N more events into this build's daemon, its
RSS at start and end. Events: 2 channels, int16, 0.1–0.5 s at 20.8 kHz, from the simulator. The sender is this
build's ``wingbeat replay`` for both builds (the wire format is the same).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "8868303"  # the build before daemon/ moved into subpackages
sys.path.insert(0, str(ROOT))

from daemon.data.datasets import read_recordings
from model import blockdft
from model.spectra import FeatureConfig, featurise_events

SENDER = r"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
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


class Bench:
    """Settings of one run and the helpers that drive the sender, the subscriber and the daemons."""

    def __init__(self, args: argparse.Namespace, work: Path, data: Path, model: Path) -> None:
        self.args, self.work, self.data, self.model = args, work, data, model

    def send(self, endpoint: str, rate: float, sensor: str, repeat: int = 1) -> subprocess.Popen[str]:
        root = str(self.work / "current-tree")  # this build's sender, from the snapshot
        args = [sys.executable, "-c", SENDER, root, str(self.data), endpoint, str(rate), sensor, "0", str(repeat)]
        return subprocess.Popen([*args, str(self.args.window)], stdout=subprocess.PIPE, text=True)

    def sustained(self, eps: dict, sensor: str) -> float:
        res = finish(self.send(eps["ingest"], 0, sensor, repeat=self.args.repeat))
        if res["acked"] < self.args.events * self.args.repeat:
            print(f"  ({res['acked']} of {self.args.events * self.args.repeat} acked)")
        return float(res["events_per_s"])

    def latency(self, eps: dict, sensor: str) -> np.ndarray:
        """Seconds from send to publish of every output of ``--events`` events sent at ``--rate``."""
        n, rate = self.args.events, self.args.rate
        sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, f"cluster.{sensor}".encode())
        sub.connect(eps["publish"])
        time.sleep(0.5)
        p = self.send(eps["ingest"], rate, sensor)
        lat: list[float] = []
        deadline = time.monotonic() + n / max(rate, 1) + 120
        while len(lat) < n and time.monotonic() < deadline:
            if sub.poll(1000):
                now = time.time_ns()
                body = json.loads(sub.recv_multipart()[1])
                lat.append((now - body["t0_ns"]) / 1e9)
        sub.close(linger=0)
        res = finish(p)
        if len(lat) < n or res["acked"] < n:
            print(f"  (only {len(lat)} outputs and {res['acked']} acks of {n} at the fixed rate)")
        return np.array(lat)

    def start_daemon(
        self, name: str, tree: Path, raw_max_bytes: int = 256 << 20
    ) -> tuple[subprocess.Popen[bytes], dict]:
        """A daemon of the build in ``tree`` serving the bench's model, on a fresh state directory."""
        conf = self.work / f"{name}.toml"
        share = self.args.trainer_share
        conf.write_text(
            '[ingest]\nendpoint = "tcp://127.0.0.1:0"\n[publish]\nendpoint = "tcp://127.0.0.1:0"\n'
            f'[metrics]\nlisten = "127.0.0.1:0"\n[store]\nraw_max_bytes = {raw_max_bytes}\n'
            "[training]\nfinetune_every_events = 100000000\nfull_every_events = 100000000\nfinetune_every_s = 0.0\n"
            "epochs_full = 300\n" + (f"cpu_share = {share}\n" if share else "")
        )
        state = self.work / f"{name}-state"
        log = open(self.work / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "daemon.cli", "run", "--config", str(conf), "--state", str(state)]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        daemon = subprocess.Popen(
            [*cmd, "--model", str(self.model)], stdout=log, stderr=subprocess.STDOUT, cwd=tree, env=env
        )
        deadline = time.monotonic() + 90
        while not (state / "endpoints.json").exists() and time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.returncode}; see {self.work / f'{name}.log'}")
            time.sleep(0.2)
        return daemon, json.loads((state / "endpoints.json").read_text())

    def measure(self, name: str, tree: Path) -> dict[str, float]:
        """One round of one build: sustained, latency, and both again while a training runs."""
        daemon, eps = self.start_daemon(name, tree)
        try:
            out = {"sustained": self.sustained(eps, "max")}
            lat = self.latency(eps, "fixed")
            out |= {"p50": ms(lat, 50), "p99": ms(lat, 99)}
            (self.work / f"{name}-state" / "retrain-request").touch()
            if not wait_for_child(daemon.pid, 30):
                print(f"  ({name}: no trainer process started)")
            time.sleep(4)  # the trainer imports torch and reads the store before its first epoch
            lat = self.latency(eps, "fixed-train")
            out |= {"p50_train": ms(lat, 50), "p99_train": ms(lat, 99)}
            out["sustained_train"] = self.sustained(eps, "max-train")
            if not children(daemon.pid):
                print(f"  ({name}: the training ended before the last measurement did; raise epochs_full)")
            if self.args.long and name.startswith("current") and name.endswith("-0"):
                self.long_run(daemon, eps)
        finally:
            daemon.terminate()
            daemon.wait(60)
        return out

    def long_run(self, daemon: subprocess.Popen[bytes], eps: dict) -> None:
        rss0 = rss_mib(daemon.pid)
        t = time.monotonic()
        repeat = max(1, self.args.long // self.args.events)
        res = finish(self.send(eps["ingest"], 0, "long", repeat=repeat), 3600)
        print(
            f"long replay: {res['acked']} events in {time.monotonic() - t:.0f} s; daemon RSS before "
            f"{rss0:.0f} MiB, after {rss_mib(daemon.pid):.0f} MiB"
        )


WELCH = {"blocks": "by shared blocks (model/blockdft.py)", "fft": "by an FFT per segment (as before)"}


@contextlib.contextmanager
def block_path(on: bool) -> Iterator[None]:
    """Featurise with the block path (this build's) or force the FFT per segment, for the comparison."""
    applies = blockdft.applies
    blockdft.applies = applies if on else (lambda *_: False)
    try:
        yield
    finally:
        blockdft.applies = applies


def finish(p: subprocess.Popen[str], timeout: float = 900) -> dict:
    out, _ = p.communicate(timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def wingbeat(tree: Path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL
    )


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def wait_for_child(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if children(pid):
            return True
        time.sleep(0.2)
    return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ms(lat: np.ndarray, q: float) -> float:
    return float(np.percentile(lat, q) * 1e3) if len(lat) else float("nan")


def snapshot(into: Path) -> Path:
    """This checkout's files as they are now (tracked and untracked, not ignored) in ``into``: every round then runs
    the same code, whatever is edited in the checkout meanwhile."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, into / name)
    print(f"current: this checkout copied to {into}")
    return into


def extract(rev: str, into: Path) -> Path:
    """The tree of ``rev`` in ``into`` (``git archive``: reads the repository, writes nothing in it)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True, text=True
    ).stdout.strip()
    print(f"baseline: {rev} ({commit}) extracted to {into}")
    return into


FIGURES = (
    ("sustained", "sustained acked durable events/s", "{:8.0f}", True),
    ("p50", "p50 latency at the fixed rate, ms", "{:8.1f}", False),
    ("p99", "p99 latency at the fixed rate, ms", "{:8.1f}", False),
    ("p50_train", "p50 latency while training, ms", "{:8.1f}", False),
    ("p99_train", "p99 latency while training, ms", "{:8.1f}", False),
    ("sustained_train", "sustained while training, events/s", "{:8.0f}", True),
)


def report(runs: dict[str, list[dict[str, float]]]) -> None:
    """Per round, then the medians and the ratio current / baseline (>1 is better for every row)."""
    names = list(runs)
    print(f"\n{'figure':38s}" + "".join(f"{n:>24s}" for n in names) + ("     better by" if len(names) == 2 else ""))
    for key, label, fmt, higher in FIGURES:
        med = [statistics.median(r[key] for r in runs[n]) for n in names]
        cells = ""
        for n, m in zip(names, med, strict=True):
            each = "/".join(fmt.format(r[key]).strip() for r in runs[n])
            cells += f"{fmt.format(m)} ({each})".rjust(24)
        ratio = ""
        if len(names) == 2 and med[0] > 0 and med[1] > 0:
            ratio = f"   {(med[0] / med[1] if higher else med[1] / med[0]):6.2f}×"
        print(f"{label:38s}{cells}{ratio}")
    print("(median of the rounds, each round's figure in brackets; 'better by': current over baseline, ×)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each build, interleaved")
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with ('none': this build only)")
    ap.add_argument("--window", type=int, default=2048, help="unacked events in flight per sender")
    ap.add_argument(
        "--repeat", type=int, default=1, help="send the events this many times for each sustained figure (new seqs)"
    )
    ap.add_argument("--long", type=int, default=0, help="events of the memory run (0 = skip)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (stores, logs: about 1 GB)")
    ap.add_argument("--trainer-share", type=float, default=0.0, help="training.cpu_share (0 = each build's default)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wingbeat-bench-"))
    builds = {"current": snapshot(work / "current-tree")}
    if args.baseline != "none":
        builds["baseline"] = extract(args.baseline, work / "baseline-tree")
    data = work / "events.npz"
    wingbeat(
        builds["current"], "simulate", "--out", str(data), "--events", str(args.events), "--species", "6", "--seed", "3"
    )
    rec = read_recordings(data)
    events = [rec.event(i) for i in range(len(rec))]
    mean_s = np.mean([e.shape[1] for e in events]) / rec.fs[0]
    print(f"{len(events)} events, 2 × int16, mean {mean_s:.2f} s at {rec.fs[0]:g} Hz; sender window {args.window}")
    for path in ("blocks", "fft"):  # untimed: the first call of each builds its tables and buffers
        with block_path(path == "blocks"):
            featurise_events(events[:64], rec.fs[:64], FeatureConfig())
    for path in ("blocks", "fft", "blocks", "fft"):  # twice each, alternating: the machine's speed moves
        with block_path(path == "blocks"):
            t = time.perf_counter()
            for i in range(0, len(events), 256):
                featurise_events(events[i : i + 256], rec.fs[i : i + 256], FeatureConfig())
        rate = len(events) / (time.perf_counter() - t)
        print(f"featurise-only loop (1 thread), Welch {WELCH[path]}: {rate:.0f} events/s")
    model = work / "model"  # a model, so that every event is published
    wingbeat(builds["current"], "train", str(data), "--out", str(model), "--epochs", "20")

    bench = Bench(args, work, data, model)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    order = list(builds)
    try:
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                got = bench.measure(f"{name}-{r}", builds[name])
                runs[name].append(got)
                print(f"round {r} {name:8s} " + "  ".join(f"{k} {v:.1f}" for k, v in got.items()), flush=True)
    finally:
        if any(runs.values()):
            report({n: v for n, v in runs.items() if v})
    if args.keep:
        print(f"(work directory: {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
