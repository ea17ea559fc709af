"""What the daemon's integration tests share: the real daemon process on random loopback ports, the command line,
a subscriber, and waits that always end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[ingest]
endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[training]
cpu_share = 1.0  # tests train at full speed; serving latency is the benchmark's business
first_after = 240
epochs_first = 60
first_restarts = 1  # one first training a test; test_supervision trains the default three
epochs_full = 60
epochs_finetune = 10
finetune_every_events = 100000
full_every_events = 100000
finetune_every_s = 0.0
# short trainings on a few hundred events differ by seed and by which events had arrived when they started;
# the gate has its own test (test_daemon.py)
gate_ari_tolerance = 0.5
gate_rec_tolerance = 1.0
"""


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def simulate(tmp_path_factory, events: int, species: int, seed: int) -> Path:
    """A recordings file from `wingbeat simulate`, for a module's tests."""
    out = tmp_path_factory.mktemp("data") / "sim.npz"
    r = cli("simulate", "--out", str(out), "--events", str(events), "--species", str(species), "--seed", str(seed))
    assert r.returncode == 0, r.stderr
    return out


def wait_for(what, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up after {timeout} s")


class Daemon:
    def __init__(self, state: Path, config: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        """``env``: variables added to this process's environment for the daemon (NOTIFY_SOCKET, …)."""
        self.state = state
        self.log = open(state.parent / f"{state.name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "run", "--config", str(config), "--state", str(state), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
        )
        info = wait_for(lambda: self._endpoints(), 60)
        self.ingest, self.publish, self.metrics = info["ingest"], info["publish"], info["metrics"]
        self.ingest_plain = info["ingest_plain"]

    def _endpoints(self) -> dict[str, str] | None:
        try:  # first: a daemon may bind and then die at once (a crash test), and its endpoints are still news
            info = json.loads((self.state / "endpoints.json").read_text())
            if info["pid"] == self.proc.pid:
                return info
        except (OSError, ValueError):
            pass
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.logs()[-2000:]}")
        return None

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.state.parent / f"{self.state.name}.log").read_text()

    def events(self) -> list[dict]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def status(self) -> dict:
        r = cli("status", "--state", str(self.state), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.log.close()
        return code


class Subscriber:
    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"cluster.")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.got: list[dict] = []

    def drain(self, until: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.got) < until and time.monotonic() < deadline:
            if self.sock.poll(200):
                self.got.append(json.loads(self.sock.recv_multipart()[1]))
        return self.got
