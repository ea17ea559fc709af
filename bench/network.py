"""Station → centre through NATS JetStream, beside the station's own ingest rate; the outbox drain after an outage.

    python bench/network.py [--events 3000] [--raw]

Starts a real nats-server (JetStream, loopback, a temporary store), one station (``wingbeat run`` with
``[network]``) and the centre (``wingbeat central``, training off), all on this machine, and a sender as fast as
acks allow (window 2048):

1. live: the station's ingest rate (acked events/s at the sender) and, in the same run, its forward rate
   (``wingbeat_network_forwarded_total`` from the first to the last forwarded event) and the centre's pooling
   rate (pooled events over the time from the first send until the centre holds them all);
2. outage: nats-server stopped, the same number of events sent (they stay in the outbox: its depth and age are
   read from /metrics), nats-server started again; drain rate = outbox events / seconds from the restart until
   the outbox is empty, and the time until the centre holds them all.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings

CONFIG = """
[ingest]
endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[training]
first_after = 10000000
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if v := what():
            return v
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout} s")


class Nats:
    def __init__(self, work: Path) -> None:
        self.port, self.http = free_port(), free_port()
        self.conf = work / "nats.conf"
        self.conf.write_text(
            f"server_name: bench\nlisten: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.http}\n"
            f'jetstream {{ store_dir: "{work / "js"}" }}\n'
        )
        self.binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        self.log = open(work / "nats.log", "a")
        self.url = f"nats://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 30)

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http}/healthz?js-enabled-only=true"
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Proc:
    def __init__(self, state: Path, args: list[str]) -> None:
        self.state = state
        self.log = open(state.parent / f"{state.name}.log", "w")
        cmd = [sys.executable, "-m", "daemon.cli", *args, "--state", str(state)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.info = wait_for(self._endpoints, 60, 0.2)

    def _endpoints(self) -> dict | None:
        try:
            info = json.loads((self.state / "endpoints.json").read_text())
            return info if info["pid"] == self.proc.pid else None
        except (OSError, ValueError):
            return None

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://{self.info['metrics']}/metrics", timeout=10).read().decode()
        return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=3000, help="events sent live")
    ap.add_argument("--outage-events", type=int, default=10000, help="events sent while nats-server is down")
    ap.add_argument("--raw", action="store_true", help="forward raw samples too (network.forward_raw)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wingbeat-net-bench-"))
    data = work / "sim.npz"
    subprocess.run(
        [sys.executable, "-m", "daemon.cli", "simulate", "--out", str(data), "--events", str(a.events)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    rec = read_recordings(data)
    nats = Nats(work)
    raw = "true" if a.raw else "false"
    (work / "station.toml").write_text(
        CONFIG + f'[network]\nnats = "{nats.url}"\nstation = "s1"\nforward_raw = {raw}\n'
    )
    (work / "centre.toml").write_text(CONFIG)
    station = Proc(work / "s1", ["run", "--config", str(work / "station.toml")])
    centre = Proc(work / "centre", ["central", "--nats", nats.url, "--config", str(work / "centre.toml")])
    out: dict = {"events": a.events, "forward_raw": a.raw, "cpus": os.cpu_count()}
    try:
        wait_for(lambda: station.metric("wingbeat_network_connected") == 1, 30)
        # 1. live
        t0 = time.monotonic()
        samples: list[tuple[float, float]] = []
        res = replay(events_of(rec, "bench", 0, False), station.info["ingest"], 0.0, 2048, 30.0, 120.0)
        assert res.acked == a.events, res
        t_ingest = time.monotonic() - t0

        def forwarded() -> bool:
            samples.append((time.monotonic(), station.metric("wingbeat_network_forwarded_total")))
            return samples[-1][1] >= a.events

        wait_for(forwarded, 300)
        wait_for(lambda: centre.metric("wingbeat_network_pooled_total") >= a.events, 300)
        t_pooled = time.monotonic() - t0
        out["live"] = {
            "station_ingest_events_per_s": round(a.events / t_ingest, 1),
            "forwarded_events_per_s": round(a.events / (samples[-1][0] - t0), 1),
            "centre_pooled_events_per_s": round(a.events / t_pooled, 1),
            "seconds_until_centre_holds_all": round(t_pooled, 2),
        }
        # 2. outage: the outbox fills, then drains
        nats.stop()
        wait_for(lambda: station.metric("wingbeat_network_connected") == 0, 30)
        n = a.outage_events

        def renumbered():  # the recordings again, with fresh seqs
            seq = a.events
            while seq < a.events + n:
                for e in events_of(rec, "bench", 0, False):
                    if seq >= a.events + n:
                        return
                    e.seq, seq = seq, seq + 1
                    yield e

        t_send = time.monotonic()
        more = replay(renumbered(), station.info["ingest"], 0.0, 2048, 30, 300)
        assert more.acked == n, more
        out["outage_ingest_events_per_s"] = round(n / (time.monotonic() - t_send), 1)
        wait_for(lambda: station.metric("wingbeat_outbox_events") >= n, 30)
        depth = station.metric("wingbeat_outbox_events")
        age = station.metric("wingbeat_outbox_age_seconds")
        before = station.metric("wingbeat_network_forwarded_total")
        t1 = time.monotonic()
        nats.start()
        t_up = time.monotonic()
        first = wait_for(
            lambda: station.metric("wingbeat_network_forwarded_total") > before and time.monotonic(), 60, 0.01
        )
        wait_for(lambda: station.metric("wingbeat_network_forwarded_total") >= before + n, 300, 0.01)
        t_last = time.monotonic()
        wait_for(lambda: centre.metric("wingbeat_network_pooled_total") >= a.events + n, 300, 0.01)
        t_centre = time.monotonic()
        out["outage"] = {
            "outbox_events": depth,
            "outbox_age_seconds": age,
            "nats_server_restart_s": round(t_up - t1, 2),
            "seconds_from_restart_to_first_forward": round(first - t1, 2),
            "drain_seconds": round(t_last - first, 2),
            "drain_events_per_s": round(n / (t_last - first), 1),
            "seconds_from_restart_until_centre_holds_all": round(t_centre - t1, 2),
        }
    finally:
        for p in (station, centre):
            p.stop()
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
