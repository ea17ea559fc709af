"""A network of stations on a real nats-server with JetStream (DESIGN §9, docs/network.md): stations forward their
events through the outbox, the centre pools them exactly once, trains, and every station takes its versions.
Real processes on loopback ports; nats-server is started here as tests/test_prometheus.py starts Prometheus.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import pytest
from harness import CONFIG, ROOT, Daemon, cli, simulate, wait_for
from test_faults import Sender, figures, record

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.store.db import DB_NAME

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

    def __init__(
        self,
        work: Path,
        name: str = "n1",
        mqtt: bool = False,
        cluster: dict[str, int] | None = None,
        extra: str = "",
    ):
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
        self.conf.write_text("\n".join([*lines, extra]) + "\n")
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


def start(*makers):
    """Start daemons at once (each waits for its own endpoints): their start-ups overlap."""
    with ThreadPoolExecutor(len(makers)) as ex:
        return [f.result() for f in [ex.submit(m) for m in makers]]


def station_config(tmp: Path, name: str, nats: str, **extra: str) -> Path:
    cfg = tmp / f"{name}.toml"
    more = "".join(f"{k} = {v}\n" for k, v in extra.items())
    cfg.write_text(CONFIG + f'\n[network]\nnats = "{nats}"\nstation = "{name}"\n{more}')
    return cfg


def centre_config(tmp: Path, replicas: int = 1) -> Path:
    """The harness's config with a short first training: the tests need a version, not a good one."""
    cfg = tmp / "centre.toml"
    assert "epochs_first = 60" in CONFIG
    cfg.write_text(CONFIG.replace("epochs_first = 60", "epochs_first = 15") + f"\n[network]\nreplicas = {replicas}\n")
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
    """The version a daemon serves (0 = none), from its store: cheaper to poll than ``wingbeat status``."""
    try:
        db = sqlite3.connect(f"file:{d.state / DB_NAME}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return 0
    try:
        row = db.execute("SELECT max(version) FROM models WHERE status = 'serving'").fetchone()
        return int(row[0] or 0)
    finally:
        db.close()


def send(d: Daemon, rec, sensor: str, lo: int, hi: int, give_up_s: float = 60.0):
    events = islice(events_of(rec, sensor, 0, False), lo, hi)
    return replay(events, d.ingest, 0.0, 64, 5.0, give_up_s)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 2 * N, 3, 7)


@needs_nats
def test_two_stations_and_a_centre_share_one_model(tmp_path, sim):
    """Every event reaches the centre once; the centre trains; both stations swap to its version and give the same
    recording the same cluster; MQTT subscribers (Home Assistant, Node-RED) read the outputs through nats-server's
    MQTT listener (subject wingbeat.out.s1.3 is topic wingbeat/out/s1/3)."""
    import paho.mqtt.client as mqtt

    rec = read_recordings(sim)
    nats = NatsServer(tmp_path / "nats", mqtt=True)
    stations: list[Daemon] = []
    centre = None
    got: list[tuple[str, dict]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="wingbeat-test")
    subscribed = threading.Event()
    client.on_connect = lambda c, *_: c.subscribe("wingbeat/out/#", qos=0)
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_message = lambda c, u, m: got.append((m.topic, json.loads(m.payload)))
    try:
        client.connect("127.0.0.1", nats.mqtt, keepalive=10)
        client.loop_start()
        assert subscribed.wait(20)
        cfgs = [station_config(tmp_path, name, nats.url) for name in ("s1", "s2")]
        ccfg = centre_config(tmp_path)
        *stations, centre = start(
            lambda: Daemon(tmp_path / "s1", cfgs[0]),
            lambda: Daemon(tmp_path / "s2", cfgs[1]),
            lambda: Centre(tmp_path / "centre", ccfg, nats.url, "--first-training-after", str(2 * N)),
        )
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
        wait_for(lambda: len(got) >= 2 * N, 30)
        assert {(topic.split("/")[2], m["seq"]) for topic, m in got} == {(s, q) for s in ("s1", "s2") for q in range(N)}
        assert all(topic.split("/")[3] == str(m["cluster"]) and m["model_version"] == v for topic, m in got)
        publish_junk(nats.url)  # a foreign publisher on the stream: quarantined and counted at the centre
        wait_for(lambda: metric(centre, 'wingbeat_network_quarantined_total{reason="frame"}') == 1, 30)
        wait_for(lambda: metric(centre, "wingbeat_backlog_events") == 0, 60)  # the centre serves pooled events too
        r = cli("status", "--state", str(centre.state), "--json")
        st = json.loads(r.stdout.splitlines()[-1])
        assert st["per_station"] == {"s1": N, "s2": N} and st["per_sensor"] == {"s1/trap": N, "s2/trap": N}
        assert st["quarantine"] == {"frame": 1} and st["outputs"] == 2 * N
        wait_for(lambda: stream_messages(nats) == 0, 30)  # every message acked after its commit, the junk too
        r = cli("export", "--state", str(centre.state), "--out", str(tmp_path / "pooled.csv"))
        assert r.returncode == 0, r.stderr
        lines = (tmp_path / "pooled.csv").read_text().splitlines()
        col = lines[0].split(",").index("station")
        assert Counter(line.split(",")[col] for line in lines[1:]) == {"s1": N, "s2": N}
        for d in stations:  # the station trains nothing of its own
            assert not [e for e in d.events() if e.get("event") == "training_started"]
            m = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
            assert "wingbeat_outbox_events 0.0" in m and "wingbeat_network_connected 1.0" in m
    finally:
        client.loop_stop()
        client.disconnect()
        for d in [*stations, *([centre] if centre else [])]:
            if d.proc.poll() is None:
                assert d.stop() == 0, d.logs()[-3000:]
        nats.stop()


class Streaming:
    """A sender in a thread: ``events`` to ``endpoint`` at ``rate`` per second; what it sent and what was acked."""

    def __init__(self, sender: Sender, rec, sensor: str, lo: int, hi: int, endpoint: str, rate: float, give_up_s=5.0):
        events = islice(events_of(rec, sensor, 0, False), lo, hi)
        self.thread = threading.Thread(
            target=lambda: sender.replay(
                events, endpoint, rate=rate, window=32, ack_timeout_s=2.0, give_up_s=give_up_s
            ),
            daemon=True,
        )
        self.thread.start()

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the sender did not finish"


def publish_junk(url: str) -> None:
    import asyncio

    import nats

    async def go() -> None:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            ack = await nc.jetstream().publish("wingbeat.events.evil.x", b"junk", timeout=5)
            assert ack.stream == "WINGBEAT_EVENTS"
        finally:
            await nc.close()

    asyncio.run(go())


def stream_messages(nats: NatsServer) -> int:
    """Messages held by the events stream (a work queue: what the centre has not acked yet)."""
    info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{nats.http}/jsz?streams=true", timeout=10).read())
    streams = {s["name"]: s["state"] for a in info["account_details"] for s in a.get("stream_detail", [])}
    return int(streams["WINGBEAT_EVENTS"]["messages"])


def stream_detail(node: NatsServer, stream: str = "WINGBEAT_EVENTS") -> dict:
    """The stream as ``node``'s monitoring endpoint (/jsz) reports it, with its config and cluster."""
    url = f"http://127.0.0.1:{node.http}/jsz?streams=true&config=true"
    info = json.loads(urllib.request.urlopen(url, timeout=10).read())
    streams = {s["name"]: s for a in info.get("account_details", []) for s in a.get("stream_detail", [])}
    return streams.get(stream, {})


def stream_leader(node: NatsServer, stream: str = "WINGBEAT_EVENTS") -> str:
    """The server name of ``stream``'s leader as ``node`` sees it ("" while it has none)."""
    return str(stream_detail(node, stream).get("cluster", {}).get("leader", ""))


def connections(node: NatsServer) -> set[str]:
    """The names of the clients connected to ``node`` (/connz): ``wingbeat-<station>``, ``wingbeat-centre``."""
    info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{node.http}/connz", timeout=10).read())
    return {c.get("name", "") for c in info.get("connections") or []}


def metric(d: Daemon, name: str) -> float:
    text = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def centre_figures(state: Path, sender: Sender, station: str) -> dict[str, int]:
    """``figures`` of one station's events at the centre (sensors are unique per station in these tests)."""
    assert all(station in s for s, _ in sender.sent)
    return figures(state, sender.sent, sender.acked)


@needs_nats
@pytest.mark.faults
def test_faults_station_killed_nats_down_centre_killed_during_training(tmp_path, sim):
    """A station killed with SIGKILL mid-stream and restarted; nats-server stopped for 20 s mid-stream; the centre
    killed with SIGKILL during a training. Nothing lost or duplicated at the centre, every station on the newest
    accepted version."""
    rec = read_recordings(sim)
    nats = NatsServer(tmp_path / "nats")
    cfg1, cfg2 = station_config(tmp_path, "s1", nats.url), station_config(tmp_path, "s2", nats.url)
    ccfg = centre_config(tmp_path)
    s1, s2, centre = start(
        lambda: Daemon(tmp_path / "s1", cfg1),
        lambda: Daemon(tmp_path / "s2", cfg2),
        lambda: Centre(tmp_path / "centre", ccfg, nats.url, "--first-training-after", str(2 * N)),
    )
    a, b = Sender(), Sender()
    try:
        # 1. station s1 killed mid-stream, restarted, its sender resends everything: duplicates acked as such
        run = Streaming(a, rec, "s1-a", 0, N, s1.ingest, rate=400)
        wait_for(lambda: len(a.acked) > N // 3, 30, every=0.05)
        s1.stop(signal.SIGKILL)
        run.join()
        t = time.monotonic()
        s1 = Daemon(tmp_path / "s1", cfg1)
        res = a.replay(islice(events_of(rec, "s1-a", 0, False), 0, N), s1.ingest, window=64, give_up_s=60)
        assert res.acked == N
        wait_for(lambda: sum(1 for k in pooled(centre.state) if k[0] == "s1") == N, 60)
        record("station killed", "SIGKILL station mid-stream, restart, resend", N,
               centre_figures(centre.state, a, "s1"), res.duplicates, time.monotonic() - t)  # fmt: skip

        # 2. nats-server stopped for 20 s while station s2 ingests: its outbox holds the events, then drains
        run = Streaming(b, rec, "s2-b", 0, N, s2.ingest, rate=20, give_up_s=60)
        wait_for(lambda: len(b.acked) > 40, 30, every=0.05)
        nats.stop()
        down = time.monotonic()
        wait_for(lambda: metric(s2, "wingbeat_network_connected") == 0, 20)
        # down until the outbox holds more than 100 events, its oldest over 10 s old, and 20 s at least: counted,
        # not assumed from the sender's rate (a slow machine takes longer to get there, a fast one waits 20 s)
        wait_for(
            lambda: metric(s2, "wingbeat_outbox_events") > 100 and metric(s2, "wingbeat_outbox_age_seconds") > 10,
            120,
            every=0.5,
        )
        time.sleep(max(0.0, 20 - (time.monotonic() - down)))
        t = time.monotonic()  # from the start of nats-server (its health check may answer after the drain)
        nats.start()
        run.join()
        wait_for(lambda: sum(1 for k in pooled(centre.state) if k[0] == "s2") == N, 90)
        drained = time.monotonic() - t
        record("nats-server down 20 s", "SIGTERM nats-server mid-stream, start again", N,
               centre_figures(centre.state, b, "s2"), None, drained)  # fmt: skip
        wait_for(lambda: metric(s2, "wingbeat_outbox_events") == 0, 30)

        # 3. the centre killed during its first training; restarted, it trains again and every station takes it
        wait_for(lambda: [e for e in centre.events() if e.get("event") == "training_started"], 60, every=0.2)
        centre.stop(signal.SIGKILL)
        more = Sender()
        more.replay(islice(events_of(rec, "s1-c", 0, False), 0, 50), s1.ingest, window=64, give_up_s=30)
        t = time.monotonic()
        centre = Centre(tmp_path / "centre", ccfg, nats.url, "--first-training-after", str(2 * N))
        v = wait_for(lambda: serving(centre), 240, every=1)
        for d in (s1, s2):
            wait_for(lambda d=d: serving(d) == v, 60, every=0.5)
        recovered = time.monotonic() - t
        wait_for(lambda: sum(1 for k in pooled(centre.state) if k[1] == "s1-c") == 50, 60)
        record("centre killed in training", "SIGKILL centre during a training, restart", 50,
               centre_figures(centre.state, more, "s1"), None, recovered)  # fmt: skip
        models = centre.status()["models"]
        assert [m["status"] for m in models if m["status"] in ("serving", "failed")][-1] == "serving"
        assert max(m["version"] for m in models if m["status"] == "serving") == v
        rows = pooled(centre.state)
        assert max(rows.values()) == 1 and len(rows) == 2 * N + 50
    finally:
        for d in (s1, s2, centre):
            if d.proc.poll() is None:
                d.stop()
        nats.stop()


@needs_nats
@pytest.mark.faults
def test_three_node_cluster_loses_nothing_when_a_node_stops(tmp_path, sim):
    """Stream and bucket with 3 replicas on a three-node cluster; the events stream's leader stopped mid-stream."""
    rec = read_recordings(sim)
    names = ("n1", "n2", "n3")
    ports = {n: free_port() for n in names}
    nodes = [NatsServer(tmp_path / n, n, cluster=ports) for n in names]
    urls = ",".join(n.url for n in nodes)
    st = centre = None
    sender = Sender()
    try:
        scfg, ccfg = station_config(tmp_path, "s1", urls, replicas="3"), centre_config(tmp_path, 3)
        st, centre = start(
            lambda: Daemon(tmp_path / "s1", scfg),
            lambda: Centre(tmp_path / "centre", ccfg, urls, "--first-training-after", "100000"),
        )
        run = Streaming(sender, rec, "s1-a", 0, N, st.ingest, rate=60, give_up_s=60)
        wait_for(lambda: len(sender.acked) > N // 3, 30, every=0.05)
        # the node to stop is the events stream's leader (it answers every publish and every consumer fetch),
        # looked up now, wherever the station and the centre happen to be connected
        leader = wait_for(lambda: stream_leader(nodes[0]), 30)
        by_name = {n.name: n for n in nodes}

        def placed() -> dict[str, set[str]] | None:
            """Node → its clients, once the station and the centre are each connected to one node."""
            clients = {name: connections(node) for name, node in by_name.items()}
            once = all(sum(client in c for c in clients.values()) == 1 for client in ("wingbeat-s1", "wingbeat-centre"))
            return clients if once else None

        clients = wait_for(placed, 30)
        by_name[leader].stop()
        t = time.monotonic()
        left = [n for n in nodes if n.name != leader]
        moved = wait_for(lambda: (now := stream_leader(left[0])) not in ("", leader) and now, 60)
        assert moved in {n.name for n in left}  # the stream moved to a surviving node: the leader was stopped
        run.join()
        wait_for(lambda: len(pooled(centre.state)) == N, 90)
        assert stream_detail(left[0])["config"]["num_replicas"] == 3
        counts = centre_figures(centre.state, sender, "s1")
        on = ", ".join(c.removeprefix("wingbeat-") for c in sorted(clients[leader])) or "no client"
        print(f"stream leader {leader} stopped; connected to it: {on}; clients {clients}")
        record("NATS node stopped (3 replicas)", "SIGTERM the stream leader's node of three mid-stream", N, counts,
               None, time.monotonic() - t)  # fmt: skip
    finally:
        for d in (st, centre):
            if d is not None and d.proc.poll() is None:
                d.stop()
        for n in nodes:
            n.stop()


def tls_files(d: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, made with openssl for this test only."""
    d.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=wingbeat-test-ca")  # fmt: skip
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "ext")  # fmt: skip
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@needs_nats
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")
def test_tls_and_nkey_to_nats_and_refused_without_either(tmp_path, sim):
    """TLS with the configured CA and a user's nkey: forwarded. Without the CA (the system's CAs do not know this
    server) or without the nkey (the server knows its users by public nkey): refused, the events wait."""
    import nkeys

    f = tls_files(tmp_path / "tls")
    seed = nkeys.encode_seed(bytes(range(32)), nkeys.PREFIX_BYTE_USER)
    (tmp_path / "s.nk").write_bytes(seed + b"\n")
    (tmp_path / "s.nk").chmod(0o600)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    auth = f'tls {{ cert_file: "{f["cert"]}", key_file: "{f["key"]}" }}\n'
    auth += f"authorization {{ users: [ {{ nkey: {public} }} ] }}"
    nats = NatsServer(tmp_path / "nats", extra=auth)
    url = f"tls://127.0.0.1:{nats.port}"
    ca, nk = f'"{f["ca"]}"', f'"{tmp_path / "s.nk"}"'
    rec = read_recordings(sim)
    daemons: list[Daemon] = []
    try:
        cfgs = {
            "s1": station_config(tmp_path, "s1", url, tls_ca=ca, nkey=nk),
            "s2": station_config(tmp_path, "s2", url, nkey=nk),  # the system's CAs: not this server's
            "s3": station_config(tmp_path, "s3", url, tls_ca=ca),  # no nkey: not a user of this server
        }
        daemons = start(*(lambda n=n, c=c: Daemon(tmp_path / n, c) for n, c in cfgs.items()))
        st, no_ca, no_key = daemons
        for d in daemons:
            assert send(d, rec, "trap", 0, 20).acked == 20
        wait_for(lambda: metric(st, "wingbeat_network_forwarded_total") == 20, 60)
        assert metric(st, "wingbeat_network_connected") == 1
        assert stream_messages(nats) == 20  # no centre yet: the work queue keeps them
        for d, why in ((no_ca, "CERTIFICATE_VERIFY_FAILED"), (no_key, "Authorization")):
            wait_for(lambda d=d: metric(d, "wingbeat_outbox_events") == 20, 20)
            assert metric(d, "wingbeat_network_connected") == 0
            assert any(e.get("event", "").startswith("network_") and why in e.get("error", "") for e in d.events())
    finally:
        for d in daemons:
            if d.proc.poll() is None:
                d.stop()
        nats.stop()


def bucket_names(url: str, bucket: str) -> list[str]:
    """The live object names of a JetStream object store, read with the nats-py client."""
    import asyncio

    import nats
    from nats.js.errors import NotFoundError

    async def names() -> list[str]:
        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            obs = await nc.jetstream(timeout=5).object_store(bucket)
            return sorted(i.name for i in await obs.list() if not i.deleted)
        except NotFoundError:  # the bucket is not there yet, or holds nothing yet (nats-py raises on an empty list)
            return []
        finally:
            await nc.close()

    return asyncio.run(names())


@needs_nats
def test_the_centre_keeps_only_the_newest_versions_in_the_bucket(tmp_path):
    """Versions 1–4 offered by the centre's link with keep_versions = 2: the bucket ends with v3 and v4, each as put."""
    from daemon.net.link import NetworkLink
    from daemon.net.wire import unpack_version
    from daemon.ops.config import Network
    from daemon.ops.metrics import Metrics
    from daemon.store.db import Store
    from model.checkpoint import FILES

    nats = NatsServer(tmp_path / "nats")
    store = Store(tmp_path / "state")
    link = NetworkLink(Network(nats=nats.url, role="centre", keep_versions=2), tmp_path / "state", store, Metrics())
    try:
        link.start(0, None)
        for n in range(1, 5):
            version = tmp_path / f"v{n}"
            version.mkdir()
            for name in FILES:
                (version / name).write_bytes(f"{name} of version {n}".encode())
            link.offer_version(n, version)
            wait_for(lambda n=n: f"v{n}" in bucket_names(nats.url, "wingbeat-models"), 30)
        wait_for(lambda: bucket_names(nats.url, "wingbeat-models") == ["v3", "v4"], 30)
    finally:
        link.stop(store)
        store.close()
    nats.stop()
    nats.start()  # what the server kept on disk, read after a restart
    try:
        import asyncio

        import nats as nats_client

        async def get(name: str) -> bytes:
            nc = await nats_client.connect(nats.url, connect_timeout=5)
            try:
                return (await (await nc.jetstream(timeout=5).object_store("wingbeat-models")).get(name)).data
            finally:
                await nc.close()

        assert bucket_names(nats.url, "wingbeat-models") == ["v3", "v4"]
        got = unpack_version(asyncio.run(get("v4")), tmp_path / "got" / "v4")
        assert {name: (got / name).read_bytes() for name in FILES} == {
            name: f"{name} of version 4".encode() for name in FILES
        }
    finally:
        nats.stop()


@needs_nats
def test_a_station_sends_its_diversity_summaries_on_nats(tmp_path, sim):
    """A station's closed summary windows (``[diversity] summary_every_s = 2``) go out on
    ``wingbeat.diversity.<station>``, with the fields of ``wingbeat diversity --json``, covering every output once."""
    import asyncio

    import nats as nats_client

    rec = read_recordings(sim)
    nats = NatsServer(tmp_path / "nats")
    cfg = tmp_path / "s1.toml"
    network = f'\n[network]\nnats = "{nats.url}"\nstation = "s1"\ntrain_locally = true\n'
    cfg.write_text(
        CONFIG.replace("epochs_first = 60", "epochs_first = 15") + network + "[diversity]\nsummary_every_s = 2\n"
    )
    got: list[tuple[str, dict]] = []
    ready, done = threading.Event(), threading.Event()

    async def listen() -> None:
        nc = await nats_client.connect(nats.url, connect_timeout=5)

        async def on(msg) -> None:
            got.append((msg.subject, json.loads(msg.data)))

        await nc.subscribe("wingbeat.diversity.>", cb=on)
        await nc.flush(timeout=5)
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.1)
        await nc.close()

    listener = threading.Thread(target=lambda: asyncio.run(listen()), daemon=True)
    listener.start()
    d = None
    try:
        assert ready.wait(20)
        d = Daemon(tmp_path / "s1", cfg)
        assert send(d, rec, "trap", 0, N).acked == N

        def short() -> list[dict]:
            return [body for _, body in list(got) if body["window_s"] == 2]

        wait_for(lambda: sum(s["events"] for s in short()) >= N, 240, every=1)
        assert sum(s["events"] for s in short()) == N  # every output in one window
        fields = {"station", "start", "end", "events", "novel", "model_version", "abundance", "observed"}
        fields |= {"estimated", "ci95", "coverage"}
        for subject, body in got:
            assert subject == "wingbeat.diversity.s1" and body["station"] == "s1" and fields <= set(body), body
            assert body["events"] == body["novel"] + sum(body["abundance"].values()), body
    finally:
        done.set()
        listener.join(10)
        if d is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.logs()[-3000:]
        nats.stop()


def species_events(rec, keep: set[str], n: int):
    """The first ``n`` events of ``rec`` whose species is in ``keep``, numbered 0, 1, … on sensor ``trap``."""
    picked = (e for e in events_of(rec, "trap", 0, False) if e.label in keep)
    return (dataclasses.replace(e, seq=i) for i, e in enumerate(islice(picked, n)))


@needs_nats
def test_the_centre_reports_the_networks_diversity_by_station(tmp_path, sim):
    """Two stations hear different communities (one species each, not the same); the centre pools them, trains and
    labels both; ``wingbeat diversity --by station`` at the centre gives one window per station with exactly the events
    that station sent, and the network's gamma, alpha, beta (1 ≤ beta ≤ 2 for two sites) and a symmetric
    Bray–Curtis / Sørensen matrix with zero diagonal whose off-diagonal entry is that of the two windows."""
    from model.diversity import bray_curtis, sorensen

    rec = read_recordings(sim)
    names = sorted(set(map(str, rec.label)))
    assert len(names) == 3, names
    keep = {"s1": {names[0]}, "s2": {names[2]}}
    n = 150
    nats = NatsServer(tmp_path / "nats")
    stations: list[Daemon] = []
    centre = None
    try:
        cfgs = {s: station_config(tmp_path, s, nats.url) for s in keep}
        ccfg = centre_config(tmp_path)
        *stations, centre = start(
            lambda: Daemon(tmp_path / "s1", cfgs["s1"]),
            lambda: Daemon(tmp_path / "s2", cfgs["s2"]),
            lambda: Centre(tmp_path / "centre", ccfg, nats.url, "--first-training-after", str(2 * n)),
        )
        for d, s in zip(stations, keep, strict=True):
            res = replay(species_events(rec, keep[s], n), d.ingest, 0.0, 64, 5.0, 60.0)
            assert res.acked == n, res
        wait_for(lambda: sum(pooled(centre.state).values()) >= 2 * n, 60)
        v = wait_for(lambda: serving(centre), 240, every=1)
        args = ["diversity", "--state", str(centre.state), "--by", "station"]

        def labelled() -> list[dict] | None:
            r = cli(*args, "--json")
            assert r.returncode == 0, r.stderr
            rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
            windows = [w for w in rows if "network" not in w]
            done = len(windows) == 2 and all(w["pending"] == 0 and w["model_version"] == v for w in windows)
            return rows if done else None

        rows = wait_for(labelled, 120, every=2)  # history re-labelled by the serving version
        windows, nets = rows[:-1], [r["network"] for r in rows if "network" in r]
        assert len(nets) == 1 and "network" in rows[-1]
        net = nets[0]
        assert [w["station"] for w in windows] == net["stations"] == ["s1", "s2"]
        assert [w["events"] for w in windows] == [n, n]  # what each station sent, once
        for w in windows:
            assert w["events"] == w["novel"] + sum(w["abundance"].values()), w
        vectors = [[w["abundance"].get(str(c), 0) for c in net["clusters"]] for w in windows]
        assert all(sum(x) > 0 for x in vectors), vectors
        richness = [sum(1 for a in x if a > 0) for x in vectors]
        pooled_richness = sum(1 for a, b in zip(*vectors, strict=True) if a + b > 0)
        assert net["gamma"]["q0"] == pooled_richness and net["alpha"]["q0"] == pytest.approx(sum(richness) / 2)
        for q in ("q0", "q1", "q2"):
            assert 1 - 1e-9 <= net["beta"][q] <= 2 + 1e-9, net
            assert net["beta"][q] == pytest.approx(net["gamma"][q] / net["alpha"][q])
        for metric, known in (("bray_curtis", bray_curtis), ("sorensen", sorensen)):
            m = net[metric]
            assert m[0][0] == m[1][1] == 0.0 and m[0][1] == m[1][0], (metric, m)
            assert m[0][1] == pytest.approx(known(*vectors), abs=1e-6), (metric, m, vectors)
        r = cli(*args)  # the table
        assert r.returncode == 0, r.stderr
        assert "s1" in r.stdout and "s2" in r.stdout and "bray_curtis" in r.stdout, r.stdout
    finally:
        for d in [*stations, *([centre] if centre else [])]:
            if d.proc.poll() is None:
                assert d.stop() == 0, d.logs()[-3000:]
        nats.stop()
