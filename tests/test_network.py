"""A network of stations on a real nats-server with JetStream (DESIGN §9, docs/network.md): stations forward their
events through the outbox, the centre pools them exactly once, trains, and every station takes its versions.
Real processes on loopback ports; nats-server is started here as tests/test_prometheus.py starts Prometheus.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
from harness import CONFIG, ROOT, Daemon, simulate, wait_for

from daemon.clients import events_of, replay
from daemon.datasets import read_recordings
from daemon.store import DB_NAME

pytestmark = pytest.mark.slow
NATS = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
needs_nats = pytest.mark.skipif(NATS is None, reason="nats-server is not installed (make test-deps installs it)")
N = 300  # events per station


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """The real ``nats-server`` with JetStream on free loopback ports; its store and log under ``work``.
    ``routes``: the cluster ports of the other nodes (a cluster of ``len(routes) + 1``)."""

    def __init__(self, work: Path, name: str = "n1", mqtt: bool = False, cluster: dict[str, int] | None = None):
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.name = work, name
        self.port, self.http = free_port(), free_port()
        self.mqtt = free_port() if mqtt else 0
        lines = [
            f"server_name: {name}",
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http}",
            f'jetstream {{ store_dir: "{work / "js"}" }}',
        ]
        if mqtt:
            lines.append(f"mqtt {{ listen: 127.0.0.1:{self.mqtt} }}")
        if cluster:  # {node name: cluster port}, this one included
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for n, p in cluster.items() if n != name)
            lines.append(f"cluster {{ name: wb, listen: 127.0.0.1:{cluster[name]}, routes: [{routes}] }}")
        self.conf = work / "nats.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, wait: bool = True) -> None:
        with open(self.work / "nats.log", "a") as log:
            assert NATS is not None
            self.proc = subprocess.Popen([NATS, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(self._ready, timeout)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {(self.work / 'nats.log').read_text()[-2000:]}")
        try:
            url = f"http://127.0.0.1:{self.http}/healthz?js-enabled-only=true"
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Centre(Daemon):
    """``wingbeat central`` as the harness runs ``wingbeat run``."""

    def __init__(self, state: Path, config: Path, nats: str, *extra: str) -> None:
        self.state = state
        self.log = open(state.parent / f"{state.name}.log", "a")
        cmd = [sys.executable, "-m", "daemon.cli", "central", "--nats", nats, "--state", str(state)]
        cmd += ["--config", str(config), *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        info = wait_for(lambda: self._endpoints(), 60)
        self.ingest, self.publish, self.metrics = info["ingest"], info["publish"], info["metrics"]


def station_config(tmp: Path, name: str, nats: str, **extra: str) -> Path:
    cfg = tmp / f"{name}.toml"
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    cfg.write_text(CONFIG + f'\n[network]\nnats = "{nats}"\nstation = "{name}"\n{more}')
    return cfg


def centre_config(tmp: Path, **training: int) -> Path:
    cfg = tmp / "centre.toml"
    cfg.write_text(CONFIG + "".join(f"\n[training]\n{k} = {v}" for k, v in training.items() if False))
    return cfg


def pooled(state: Path) -> Counter[tuple[str, str, int]]:
    """(station, sensor, seq) → rows in the centre's store (read-only)."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        return Counter(db.execute("SELECT station, sensor, seq FROM events"))
    finally:
        db.close()


def clusters(state: Path) -> dict[tuple[str, int], tuple[int, int]]:
    """(sensor, seq) → (model version, cluster) of a station's stored outputs."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        q = "SELECT e.sensor, e.seq, o.model_version, o.cluster FROM events e JOIN outputs o ON o.event_id = e.id"
        return {(s, q_): (v, c) for s, q_, v, c in db.execute(q)}
    finally:
        db.close()


def serving(d: Daemon) -> int:
    return int(d.status()["serving"] or 0)


def send(d: Daemon, rec, sensor: str, lo: int, hi: int, give_up_s: float = 60.0):
    events = islice(events_of(rec, sensor, 0, False), lo, hi)
    return replay(events, d.ingest, 0.0, 64, 5.0, give_up_s)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 2 * N, 3, 7)


@needs_nats
def test_two_stations_and_a_centre_share_one_model(tmp_path, sim):
    rec = read_recordings(sim)
    nats = NatsServer(tmp_path / "nats")
    stations: list[Daemon] = []
    centre = None
    try:
        for name in ("s1", "s2"):
            stations.append(Daemon(tmp_path / name, station_config(tmp_path, name, nats.url)))
        centre = Centre(tmp_path / "centre", centre_config(tmp_path), nats.url, "--first-training-after", str(2 * N))
        for d in stations:  # two stations, sensors of the same name: unique by station at the centre
            res = send(d, rec, "trap", 0, N)
            assert res.acked == N, res
        rows = wait_for(lambda: (r := pooled(centre.state)) and sum(r.values()) >= 2 * N and r, 60)
        assert set(rows) == {(s, "trap", q) for s in ("s1", "s2") for q in range(N)}
        assert max(rows.values()) == 1
        v = wait_for(lambda: serving(centre), 180, every=1)
        for d in stations:
            wait_for(lambda d=d: serving(d) == v, 60, every=0.5)
        # every stored recording through the network's version: the same cluster on both stations
        c1 = wait_for(lambda: (c := clusters(stations[0].state)) and len(c) == N and c, 60)
        c2 = wait_for(lambda: (c := clusters(stations[1].state)) and len(c) == N and c, 60)
        assert c1 == c2 and {ver for ver, _ in c1.values()} == {v}
        st = centre.status()
        assert st["per_station"] == {"s1": N, "s2": N} and st["per_sensor"] == {"s1/trap": N, "s2/trap": N}
        for d in stations:  # the station trains nothing of its own
            assert not [e for e in d.events() if e.get("event") == "training_started"]
            m = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
            assert "wingbeat_outbox_events 0.0" in m and "wingbeat_network_connected 1.0" in m
    finally:
        for d in [*stations, *([centre] if centre else [])]:
            if d.proc.poll() is None:
                assert d.stop() == 0, d.logs()[-3000:]
        nats.stop()
