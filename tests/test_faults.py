"""Fault injection with real processes: the daemon and its trainer killed with SIGKILL at chosen and at random
points, corrupt model versions, a full disk, a slow subscriber, a flood, a store from an older release. Each test
counts what was sent, stored, duplicated and lost, and how long recovery took; ``make faults`` prints the table.

Crash points are the daemon's own (daemon/ops/faults.py, switched on by the environment): the process kills itself
with SIGKILL at an exact place in its code, as a power cut or the OOM killer would, and is started again.
"""

from __future__ import annotations

import json
import os
import random
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
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import ROOT, Daemon, cli, simulate, wait_for

from daemon.cli.clients import ReplayResult, events_of, replay
from daemon.data.datasets import read_recordings
from daemon.protocol import Event
from daemon.store.db import DB_NAME, SCHEMA_VERSION, Store

pytestmark = pytest.mark.faults
DATA = Path(__file__).parent / "data"
TABLE = Path(os.environ.get("WINGBEAT_FAULTS_TABLE", "")) if os.environ.get("WINGBEAT_FAULTS_TABLE") else None


Key = tuple[str, int]  # (sensor, seq): one event


class Sender:
    """What a sender knows, for the table: the events it handed to ``replay`` and those the daemon acked as stored
    (status ``stored`` or ``duplicate``; a ``rejected`` ack is no promise to keep the event)."""

    def __init__(self) -> None:
        self.sent: set[Key] = set()
        self.acked: set[Key] = set()

    def _taken(self, events: Iterable[Event]) -> Iterator[Event]:
        for ev in events:
            self.sent.add((ev.sensor, ev.seq))
            yield ev

    def _on_ack(self, body: dict, _seconds: float) -> None:
        if body.get("status") != "rejected":
            self.acked.add((body["sensor"], body["seq"]))

    def replay(self, events: Iterable[Event], endpoint: str, **kwargs) -> ReplayResult:
        return replay(self._taken(events), endpoint, on_ack=self._on_ack, **kwargs)


def figures(state: Path, sent: set[Key], promised: set[Key]) -> dict[str, int]:
    """The table's counts, from the store (opened read-only) and the sender: ``stored``, the events of ``sent``
    found in the store; ``duplicates``, store rows beyond one per such event; ``lost``, the events of ``promised``
    (what the daemon acked, or for a sender that reads no acks, what it sent) that the store does not hold."""
    rows: Counter[Key] = Counter()
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        for sensor in sorted({s for s, _ in sent | promised if isinstance(s, str)}):
            for (seq,) in db.execute("SELECT seq FROM events WHERE sensor = ?", (sensor,)):
                rows[(sensor, seq)] += 1
    finally:
        db.close()
    return {
        "stored": sum(1 for k in sent if k in rows),
        "duplicates": sum(c - 1 for k, c in rows.items() if k in sent),
        "lost": len(promised - rows.keys()),
    }


def record(
    fault: str, how: str, sent: int, counts: dict[str, int], acked_as_duplicate: int | None, recover_s: float
) -> None:
    """One row of the closing table (``make faults`` collects them into a file). ``counts`` from ``figures``;
    ``acked_as_duplicate``: resent events the daemon recognised as stored already (None: the sender reads no
    acks). The row is written first, so that a loss is in the table as well as failing the test."""
    row = {"fault": fault, "how": how, "sent": sent, **{k: counts[k] for k in ("stored", "duplicates", "lost")}}
    row["acked_as_duplicate"] = acked_as_duplicate
    row["recover_s"] = round(recover_s, 2)
    print("FAULT", json.dumps(row))
    if TABLE is not None:
        with open(TABLE, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert counts["lost"] == 0 and counts["duplicates"] == 0, row


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def config(path: Path, training: str = "", ingest: str = "", publish: str = "", store: str = "") -> Path:
    """Fixed loopback ports, so a restarted daemon is where its senders and subscribers reconnect. The strings are
    more lines of each table."""
    port_in, port_pub, port_metrics = free_ports(3)
    first = "" if "first_after" in training else "first_after = 100000"
    path.write_text(
        f"""
[ingest]
endpoint = "tcp://127.0.0.1:{port_in}"
{ingest}
[publish]
endpoint = "tcp://127.0.0.1:{port_pub}"
{publish}
[metrics]
listen = "127.0.0.1:{port_metrics}"
[store]
{store}
[training]
{first}
cpu_share = 1.0
backoff_s = 1.0
gate_ari_tolerance = 2.0
{training}
"""
    )
    return path


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 400, 3, 2)


@pytest.fixture(scope="module")
def model(tmp_path_factory, sim) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    r = cli("train", str(sim), "--out", str(out), "--epochs", "20", timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def crash_env(tmp_path: Path, points: str) -> dict[str, str]:
    """Crash once at each of the comma-separated ``points``; marker files tmp_path/crashed.POINT say it happened."""
    return {"WINGBEAT_CRASH_AT": points, "WINGBEAT_CRASH_MARKER": str(tmp_path / "crashed")}


def check_store(state: Path, n: int, sensor: str) -> dict[str, int]:
    """Every (sensor, seq) stored exactly once with exactly one output; the database intact (opened read-only)."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        seqs = [s for (s,) in db.execute("SELECT seq FROM events WHERE sensor = ? ORDER BY seq", (sensor,))]
        outputs = db.execute(
            "SELECT count(*), count(DISTINCT o.event_id) FROM outputs o JOIN events e ON e.id = o.event_id"
            " WHERE e.sensor = ?",
            (sensor,),
        ).fetchone()
    finally:
        db.close()
    assert seqs == list(range(n)), f"stored {len(seqs)} of {n}"  # each once, none missing
    assert outputs == (n, n)
    return {"stored": len(seqs), "outputs": outputs[0]}


def in_background(fn, *args, **kwargs):
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn, *args, **kwargs)
    pool.shutdown(wait=False)
    return fut


class Listener:
    """A subscriber that never stops reading, in its own thread: ZeroMQ re-subscribes after a reconnect (the daemon
    restarted) only when the application calls into the socket, so a subscriber that waits without reading
    would miss what a restarted daemon publishes first."""

    def __init__(self, endpoint: str) -> None:
        self.got: list[dict] = []
        self.stop = threading.Event()
        ready = threading.Event()

        def run() -> None:
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"cluster.")
            sock.connect(endpoint)
            ready.set()
            try:
                while not self.stop.is_set():
                    if sock.poll(50):
                        self.got.append(json.loads(sock.recv_multipart()[-1]))
            finally:
                sock.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        time.sleep(0.3)  # the subscription reaches the publisher

    def seen(self, sensor: str, n: int, timeout: float) -> set[int]:
        """The sequence numbers seen (at least once) for ``sensor``, waiting up to ``timeout`` for ``n`` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len({g["seq"] for g in list(self.got) if g["sensor"] == sensor}) >= n:
                break
            time.sleep(0.1)
        return {g["seq"] for g in list(self.got) if g["sensor"] == sensor}

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def settle(d: Daemon, sub: Listener, sending, sensor: str, n: int) -> tuple[ReplayResult, dict[str, int]]:
    """The end of a crash test: the sender acked in full, the subscriber saw every event at least once, the store
    holds each event once with one output; the daemon stops cleanly."""
    res: ReplayResult = sending.result(timeout=180)
    assert (res.acked, res.unacked, res.rejected) == (n, 0, {})
    try:
        assert sub.seen(sensor, n, timeout=180) == set(range(n))
        sub.close()
        counts = check_store(d.state, n, sensor)
    finally:
        assert d.stop() == 0
    return res, counts


# ---- 1 and 7: the daemon killed at exact points and at random ---------------------------------------------------
@pytest.mark.slow
def test_daemon_killed_at_each_point_loses_nothing(tmp_path, sim, model, request):
    """One stream, three crashes: before a batch's commit, after it (committed, not acked), and halfway through
    publishing (some outputs sent, none marked). Each time the daemon is started again with the same environment;
    the sender resends what was not acked."""
    points = ["before_commit", "after_commit", "mid_publish"]
    rec = read_recordings(sim)
    n = len(rec)
    cfg = config(tmp_path / "c.toml")
    env = crash_env(tmp_path, ",".join(points))
    state = tmp_path / "state"
    d = Daemon(state, cfg, "--model", str(model), env=env)
    started = [d]  # a failed assertion leaves no daemon running
    request.addfinalizer(lambda: [x.stop() for x in started if x.proc.poll() is None])
    sub = Listener(d.publish)
    sender = AckLog()
    sending = in_background(
        sender.replay, events_of(rec, "s", 0, False), d.ingest, rate=400, window=32, ack_timeout_s=1.0, give_up_s=90
    )
    # Each crash point's own row: the events in flight when it struck (handed to the sender, not acked) and how
    # many of them the store holds in the end, and how often; lost, the acks given before the crash that the
    # store does not hold right after it (read while the daemon is dead); and how many resends the restarted
    # daemon answered "duplicate" before the next crash.
    recover: dict[str, float] = {}
    in_flight: dict[str, set[Key]] = {}
    lost_at_crash: dict[str, set[Key]] = {}
    unacked_in_store: dict[str, int] = {}
    acks_from: dict[str, int] = {}  # where in the ack log the restarted daemon's answers start
    for point in points:
        wait_for(lambda d=d: d.proc.poll() is not None, timeout=60, every=0.05)
        crashed = time.monotonic()
        assert d.proc.returncode == -signal.SIGKILL and (tmp_path / f"crashed.{point}").exists(), point
        sent, acked, acks_from[point] = sender.sent.copy(), sender.acked.copy(), len(sender.log)  # one step each
        in_flight[point], stored_now = sent - acked, held(state, "s").keys()
        lost_at_crash[point] = acked - stored_now
        unacked_in_store[point] = len(in_flight[point] & stored_now)  # committed, the ack never left
        d.log.close()
        d = Daemon(state, cfg, env=env)
        started.append(d)
        recover[point] = time.monotonic() - crashed  # killed → listening again
    res: ReplayResult = sending.result(timeout=180)
    assert (res.acked, res.unacked, res.rejected) == (n, 0, {})
    ends = [*(acks_from[p] for p in points[1:]), len(sender.log)]
    duplicate = {}
    for point, end in zip(points, ends, strict=True):
        counts = figures(state, in_flight[point], in_flight[point])
        counts["lost"] = len(lost_at_crash[point])  # what this crash lost; the in-flight events were all acked
        duplicate[point] = sum(status == "duplicate" for _, status in sender.log[acks_from[point] : end])
        record(f"daemon SIGKILL {point}", "crash point", len(in_flight[point]), counts, duplicate[point],
               recover[point])  # fmt: skip
    # known answers, from the store while the daemon was dead: the first crash (the first batch, before its
    # commit) left none of the events in flight stored; the second (after the commit of the resent batch,
    # before its acks) left them stored without an ack. The duplicate acks are not asserted: a sender whose ack
    # comes later than ack_timeout_s resends too, so their count depends on the machine's speed.
    assert in_flight["before_commit"] and in_flight["after_commit"], in_flight
    assert unacked_in_store["before_commit"] == 0 and unacked_in_store["after_commit"] >= 1, unacked_in_store
    print(f"in flight at each crash {[len(in_flight[p]) for p in points]}, stored unacked {unacked_in_store}")
    settle(d, sub, sending, "s", n)
    print(f"crash points: restarts {recover}; replay resent {res.resent}, acked as duplicates {res.duplicates}")


class AckLog(Sender):
    """A ``Sender`` that also keeps every ack in the order it came: ((sensor, seq), status)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[Key, str]] = []

    def _on_ack(self, body: dict, seconds: float) -> None:
        super()._on_ack(body, seconds)
        self.log.append(((body["sensor"], body["seq"]), str(body.get("status"))))


def held(state: Path, sensor: str) -> Counter[Key]:
    """(sensor, seq) → rows in the store now (opened read-only; the daemon may be dead or running)."""
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        return Counter((sensor, seq) for (seq,) in db.execute("SELECT seq FROM events WHERE sensor = ?", (sensor,)))
    finally:
        db.close()


@pytest.mark.slow
def test_daemon_killed_at_random_then_power_loss_checks(tmp_path, sim, model):
    """Three SIGKILLs at random moments of a stream; after each, the WAL database opens read-only and is intact."""
    rng = random.Random(7)
    rec = read_recordings(sim)
    n = len(rec)
    cfg = config(tmp_path / "c.toml")
    state = tmp_path / "state"
    d = Daemon(state, cfg, "--model", str(model))
    sub = Listener(d.publish)
    sender = Sender()
    sending = in_background(
        sender.replay, events_of(rec, "r", 0, False), d.ingest, rate=150, window=32, ack_timeout_s=1.0, give_up_s=120
    )
    downtime = 0.0
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 0.9))
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d.log.close()
        t = time.monotonic()
        assert (state / "wingbeat.sqlite-wal").exists()  # killed in WAL mode, as after a power cut
        ro = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
        assert ro.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert ro.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        ro.close()
        d = Daemon(state, cfg)
        downtime += time.monotonic() - t
    res, _ = settle(d, sub, sending, "r", n)
    counts = figures(state, sender.sent, sender.acked)
    record("daemon SIGKILL ×3 at random", "kill -9 from outside", res.sent, counts, res.duplicates, downtime)


@pytest.mark.slow
def test_daemon_killed_during_a_model_swap(tmp_path, sim):
    rec = read_recordings(sim)
    n = len(rec)
    cfg = config(tmp_path / "c.toml", "first_after = 150\nepochs_first = 8\n")
    env = crash_env(tmp_path, "swap")
    state = tmp_path / "state"
    d = Daemon(state, cfg, env=env)
    sub = Listener(d.publish)
    sender = Sender()
    sending = in_background(
        sender.replay, events_of(rec, "w", 0, False), d.ingest, rate=100, window=32, ack_timeout_s=1.0, give_up_s=120
    )
    wait_for(lambda: d.proc.poll() is not None, timeout=120, every=0.1)  # the first model's swap
    crashed = time.monotonic()
    assert d.proc.returncode == -signal.SIGKILL and (tmp_path / "crashed.swap").exists()
    d.log.close()
    d = Daemon(state, cfg, env=env)
    # the version that was being swapped in was never recorded as serving: a new training (v2) serves instead
    wait_for(lambda: d.status()["serving"], timeout=180, every=1)
    assert d.status()["serving"] == 2
    recovered = time.monotonic() - crashed
    res, _ = settle(d, sub, sending, "w", n)
    counts = figures(state, sender.sent, sender.acked)
    record("daemon SIGKILL during a model swap", "crash point", res.sent, counts, res.duplicates, recovered)


# ---- 2: the trainer killed mid-epoch and mid-write ----------------------------------------------------------------
@pytest.mark.slow
def test_trainer_killed_serving_goes_on_and_the_next_training_succeeds(tmp_path, sim):
    """The first training is killed mid-epoch, the second while writing its model version; the third serves."""
    rec = read_recordings(sim)
    n = len(rec)
    cfg = config(tmp_path / "c.toml", "first_after = 150\nepochs_first = 8\n")
    state = tmp_path / "state"
    d = Daemon(state, cfg, env=crash_env(tmp_path, "trainer_epoch,trainer_write"))
    sender = Sender()
    try:
        res = sender.replay(events_of(rec, "t", 0, False), d.ingest, rate=200, window=32, give_up_s=60)
        assert (res.acked, res.unacked) == (n, 0)  # serving (acking) went on while the trainer died

        def failures() -> list[dict]:
            return [e for e in d.events() if e.get("event") == "training_failed"]

        failed = wait_for(lambda: len(failures()) >= 2 and failures(), timeout=180)
        t = time.monotonic()
        assert all("signal 9" in f["error"] for f in failed)
        assert (tmp_path / "crashed.trainer_epoch").exists() and (tmp_path / "crashed.trainer_write").exists()
        done = wait_for(lambda: [e for e in d.events() if e.get("event") == "model_serving"], timeout=180)
        recovered = time.monotonic() - t
        assert done[0]["model_version"] == failed[-1]["model_version"] + 1  # numbers of failed runs are not reused
        wait_for(lambda: d.status()["outputs"] == n, timeout=60)
        # no half-written version anywhere a loader looks: only complete vN directories, each of which loads
        names = sorted(p.name for p in (state / "models").iterdir())
        assert names == [f"v{done[0]['model_version']}"], names
        body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert 'wingbeat_training_runs_total{kind="first",outcome="failed"} 2.0' in body
        assert [m["status"] for m in d.status()["models"]] == ["failed", "failed", "serving"]
        check_store(state, n, "t")
    finally:
        assert d.stop() == 0
    counts = figures(state, sender.sent, sender.acked)
    for point in ("trainer_epoch", "trainer_write"):
        record(f"trainer SIGKILL {point}", "crash point", res.sent, counts, res.duplicates, recovered)


# ---- 3: corrupt model versions ------------------------------------------------------------------------------------
def corrupt(version: Path, how: str) -> None:
    w = version / "weights.safetensors"
    if how == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "bit-flipped":
        data = bytearray(w.read_bytes())
        data[len(data) // 2] ^= 0x10
        w.write_bytes(bytes(data))
    elif how == "manifest missing":
        (version / "manifest.json").unlink()
    elif how == "NaN weights":  # well-formed, checksums re-signed: only the values are wrong
        import hashlib

        from safetensors.numpy import load, save

        tensors = load(w.read_bytes())
        name = sorted(tensors)[0]
        tensors[name] = np.full_like(tensors[name], np.nan)
        w.write_bytes(save(tensors))
        manifest = json.loads((version / "manifest.json").read_text())
        manifest["files"]["weights.safetensors"] = hashlib.sha256(w.read_bytes()).hexdigest()
        (version / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow
def test_corrupt_versions_are_refused_and_the_last_good_one_serves(tmp_path, sim, model):
    rec = read_recordings(sim)
    cfg = config(tmp_path / "c.toml")
    state = tmp_path / "state"
    for _ in range(2):  # v1, then v2: both imported models, v2 serving
        d = Daemon(state, cfg, "--model", str(model))
        assert d.stop() == 0
    pristine = tmp_path / "v2"
    shutil.copytree(state / "models" / "v2", pristine)
    for how in ["truncated", "bit-flipped", "manifest missing", "NaN weights"]:
        shutil.rmtree(state / "models" / "v2")
        shutil.copytree(pristine, state / "models" / "v2")
        corrupt(state / "models" / "v2", how)
        t = time.monotonic()
        d = Daemon(state, cfg)
        try:
            refused = wait_for(lambda d=d: [e for e in d.events() if e.get("event") == "model_unreadable"], timeout=30)
            assert refused[0]["model_version"] == 2, how
            serving = wait_for(lambda d=d: [e for e in d.events() if e.get("event") == "model_serving"], timeout=30)
            assert serving[-1]["model_version"] == 1, how
            recovered = time.monotonic() - t  # start to serving the last good version
            body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
            assert (
                'wingbeat_models_rejected_total{reason="unreadable"} 1.0' in body
                and "wingbeat_model_version 1.0" in body
            )
            seq0 = {"truncated": 0, "bit-flipped": 10, "manifest missing": 20, "NaN weights": 30}[how]
            sender = Sender()
            events = islice(events_of(rec, "c", 0, False), seq0, seq0 + 10)
            res = sender.replay(events, d.ingest, window=16, give_up_s=30)
            assert res.acked == 10
            wait_for(lambda d=d, n=seq0 + 10: d.status()["outputs"] >= n, timeout=30)
        finally:
            assert d.stop() == 0
        print(f"{how}: refused in one line: {refused[0]['error']}")
        counts = figures(state, sender.sent, sender.acked)
        record(f"model version {how}", "file edited on disk", res.sent, counts, res.duplicates, recovered)
    # every version corrupt: serving starts in the no-model state, and still stores what comes
    corrupt(state / "models" / "v1", "truncated")
    d = Daemon(state, cfg)
    try:
        wait_for(lambda: [e for e in d.events() if e.get("event") == "ready"], timeout=30)
        names = [e.get("event") for e in d.events()]
        assert "no_model" in names and "model_serving" not in names
        res = replay(islice(events_of(rec, "c", 0, False), 40, 50), d.ingest, window=16, give_up_s=30)
        assert res.acked == 10 and d.status()["events"] == 50
    finally:
        assert d.stop() == 0


# ---- 8: a store written by the previous release -------------------------------------------------------------------
@pytest.mark.slow
def test_a_schema_1_store_is_migrated_on_start_with_a_backup(tmp_path, sim, model):
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(DATA / "store-v1.sqlite", state / DB_NAME)
    cfg = config(tmp_path / "c.toml")
    t = time.monotonic()
    d = Daemon(state, cfg, "--model", str(model))
    try:
        recovered = time.monotonic() - t  # start (with the migration) to ready
        migrated = [e for e in d.events() if e.get("event") == "store_migrated"]
        assert migrated and migrated[0]["from_schema"] == 1 and migrated[0]["to_schema"] == SCHEMA_VERSION
        assert Path(migrated[0]["backup"]).exists()
        sender = Sender()
        events = islice(events_of(read_recordings(sim), "new", 0, False), 20)
        res = sender.replay(events, d.ingest, window=16, give_up_s=30)
        assert res.acked == 20
        st = d.status()
        assert st["events"] == 50 and st["per_sensor"] == {"trap-1": 15, "trap-2": 15, "new": 20}
    finally:
        assert d.stop() == 0
    store = Store(state, readonly=True)
    assert store.integrity_ok() and store.schema_version() == SCHEMA_VERSION
    store.close()
    counts = figures(state, sender.sent, sender.acked)
    record("store from schema 1", "old database file", res.sent, counts, res.duplicates, recovered)


# ---- 4: a full disk -----------------------------------------------------------------------------------------------
def metric(endpoint: str, name: str) -> float:
    body = urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=10).read().decode()
    total = None
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return -1.0 if total is None else total


def fill(path: Path, leave: int) -> None:
    """Write ``path`` until the filesystem has ``leave`` bytes free (0: until it is full)."""
    try:
        with open(path, "ab") as f:
            while shutil.disk_usage(path.parent).free > leave + 256 * 1024:
                f.write(b"\0" * 256 * 1024)
                f.flush()
            while leave == 0:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:  # no space left: full, as asked
        pass


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a 24 MiB filesystem needs root: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_degrades_then_recovers_by_itself(tmp_path, small_disk, sim, model):
    rec = read_recordings(sim)
    n = len(rec)
    cfg = config(tmp_path / "c.toml", store=f"min_free_bytes = {4 * 1024**2}")
    state = small_disk / "state"
    d = Daemon(state, cfg, "--model", str(model))
    try:
        fill(small_disk / "filler-1", leave=8 * 1024**2)  # room for about 160 events with their raw samples
        sender = Sender()
        sending = in_background(
            sender.replay, events_of(rec, "d", 0, False), d.ingest, rate=40, window=16, ack_timeout_s=1.0, give_up_s=120
        )
        # below min_free_bytes: raw samples are no longer kept, events still are
        wait_for(lambda: metric(d.metrics, "wingbeat_raw_paused") == 1, timeout=60)
        low = time.monotonic()
        fill(small_disk / "filler-2", leave=0)  # now nothing fits: commits fail, nothing more is acked
        wait_for(lambda: metric(d.metrics, "wingbeat_store_errors_total") > 0, timeout=60)
        stored_full = metric(d.metrics, "wingbeat_events_stored_total")
        time.sleep(3)
        assert metric(d.metrics, "wingbeat_events_stored_total") == stored_full  # acks stop with the commits
        assert d.proc.poll() is None and metric(d.metrics, "wingbeat_disk_free_bytes") < 1024**2
        assert urllib.request.urlopen(f"http://{d.metrics}/healthz", timeout=10).status == 200  # degraded, alive
        for f in small_disk.glob("filler-*"):
            f.unlink()
        freed = time.monotonic()
        res = sending.result(timeout=180)
        resumed = time.monotonic() - freed
        assert (res.acked, res.unacked, res.rejected) == (n, 0, {})
        wait_for(lambda: metric(d.metrics, "wingbeat_raw_paused") == 0, timeout=30)  # raw kept again
        wait_for(lambda: d.status()["outputs"] == n, timeout=60)
        events = [e.get("event") for e in d.events()]
        assert "raw_samples" in events and "store_failed" in events
    finally:
        assert d.stop() == 0
    check_store(state, n, "d")  # read-only integrity check included
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    raw = db.execute("SELECT count(*) FROM raw").fetchone()[0]
    db.close()
    assert 0 < raw < n  # raw samples were given up first, for the events that came while space was short
    print(
        f"full disk: {raw} of {n} events kept raw samples; full for {freed - low:.1f} s;"
        f" all acked {resumed:.1f} s later"
    )
    counts = figures(state, sender.sent, sender.acked)
    record("full disk (24 MiB tmpfs)", "filled by the test", res.sent, counts, res.duplicates, resumed)


# ---- 5: a slow subscriber, and a hung one --------------------------------------------------------------------------
SLOW_SUBSCRIBER = """
import sys, time, zmq
s = zmq.Context().socket(zmq.SUB)
s.setsockopt(zmq.RCVBUF, 4096)  # a small kernel window: what it does not read backs up quickly
s.setsockopt(zmq.RCVHWM, 10)
s.setsockopt(zmq.SUBSCRIBE, b"cluster.")
s.connect(sys.argv[1])
print("subscribed", flush=True)
time.sleep(600)  # and never reads
"""


@pytest.mark.slow
def test_a_slow_subscriber_never_blocks_ingest_and_what_it_costs_is_counted(tmp_path, sim, model):
    rec = read_recordings(sim)
    n = len(rec)
    # small kernel buffers on both ends, so that what the subscriber does not read backs up into the daemon's
    # queue whatever the kernel's buffer auto-tuning does
    cfg = config(tmp_path / "c.toml", publish="hwm = 20\nqueue_max = 100\nheartbeat_s = 1.0\nsndbuf_bytes = 4096")
    d = Daemon(tmp_path / "state", cfg, "--model", str(model))
    sender_p, sender_q = Sender(), Sender()
    fast = Listener(d.publish)
    slow = subprocess.Popen([sys.executable, "-c", SLOW_SUBSCRIBER, d.publish], stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout is not None and slow.stdout.readline().strip() == "subscribed"
        time.sleep(0.5)
        t = time.monotonic()
        res = sender_p.replay(events_of(rec, "p", 0, False), d.ingest, window=64, give_up_s=60)
        ingest_s = time.monotonic() - t
        assert (res.acked, res.unacked) == (n, 0)  # ingest went on while the subscriber read nothing
        assert metric(d.metrics, "wingbeat_publish_dropped_total") > 0
        assert metric(d.metrics, "wingbeat_publish_queue_outputs") > 0
        # the slow subscriber goes: what was queued for it reaches the others; exactly the dropped ones never do
        slow.kill()
        slow.wait(10)
        wait_for(lambda: metric(d.metrics, "wingbeat_publish_queue_outputs") == 0, timeout=30)
        got = fast.seen("p", n, timeout=5)
        # read once nothing more can be dropped: a batch's outputs are published (and some dropped) just after its
        # acks, so a count read when the last ack arrives can miss the last batch's drops
        dropped = metric(d.metrics, "wingbeat_publish_dropped_total")
        assert len(got) == n - dropped, (len(got), dropped)
        assert d.status()["outputs"] == n  # every output stays in the store (wingbeat export)

        # A subscriber that hangs (stopped process): heartbeats cut it off after 3 s (it leaves the subscription
        # count), and what is dropped after is only what the one live subscriber could not take. Not with a
        # 4 KB send buffer: a hung peer fills it at once and ZeroMQ's PING cannot get out to time out
        # (docs/daemon.md), so the daemon restarts with the system's buffers, on the same state. Without
        # heartbeats the count stays (the next test).
        assert d.stop() == 0
        fast.close()
        cfg = config(tmp_path / "c2.toml", publish="hwm = 20\nqueue_max = 100\nheartbeat_s = 1.0")
        d = Daemon(tmp_path / "state", cfg)
        fast = Listener(d.publish)
        hung = subprocess.Popen([sys.executable, "-c", SLOW_SUBSCRIBER, d.publish], stdout=subprocess.PIPE, text=True)
        assert hung.stdout is not None and hung.stdout.readline().strip() == "subscribed"
        wait_for(lambda: metric(d.metrics, "wingbeat_subscriptions") == 2, timeout=15)
        hung.send_signal(signal.SIGSTOP)
        t_hung = time.monotonic()
        wait_for(lambda: metric(d.metrics, "wingbeat_subscriptions") == 1, timeout=15, every=0.1)
        cut = time.monotonic() - t_hung
        more = sender_q.replay(events_of(rec, "q", 0, False), d.ingest, window=64, give_up_s=60)
        assert more.acked == n
        wait_for(lambda: metric(d.metrics, "wingbeat_publish_queue_outputs") == 0, timeout=60)
        dropped_2 = metric(d.metrics, "wingbeat_publish_dropped_total")  # counted since the restart
        assert len(fast.seen("q", n, timeout=10)) == n - dropped_2
        hung.kill()
        hung.wait(10)
    finally:
        slow.kill()
        fast.close()
        assert d.stop() == 0
    print(
        f"slow subscriber: {n} acked in {ingest_s:.1f} s, {dropped:.0f} outputs dropped (counted); hung one cut after "
        f"{cut:.1f} s, {dropped_2:.0f} more dropped"
    )
    counts_p = figures(tmp_path / "state", sender_p.sent, sender_p.acked)
    counts_q = figures(tmp_path / "state", sender_q.sent, sender_q.acked)
    record("slow subscriber (reads nothing)", "SUB that never reads", res.sent, counts_p, res.duplicates, ingest_s)
    record("hung subscriber (SIGSTOP)", "heartbeat cuts it", more.sent, counts_q, more.duplicates, cut)


def test_without_heartbeats_a_hung_subscriber_is_never_cut(tmp_path, sim, model):
    """The control of the hung-subscriber half above: with ``publish.heartbeat_s = 0`` a stopped subscriber stays
    connected (and would hold publishing once its buffers fill), so that test fails when heartbeats do not cut."""
    cfg = config(tmp_path / "c.toml", publish="heartbeat_s = 0.0")
    d = Daemon(tmp_path / "state", cfg, "--model", str(model))
    hung = subprocess.Popen([sys.executable, "-c", SLOW_SUBSCRIBER, d.publish], stdout=subprocess.PIPE, text=True)
    try:
        assert hung.stdout is not None and hung.stdout.readline().strip() == "subscribed"
        wait_for(lambda: metric(d.metrics, "wingbeat_subscriptions") == 1, timeout=15)
        hung.send_signal(signal.SIGSTOP)
        time.sleep(8)  # more than twice what the heartbeat test waits for (3 × 1 s and a housekeeping round)
        assert metric(d.metrics, "wingbeat_subscriptions") == 1
    finally:
        hung.kill()
        hung.wait(10)
        assert d.stop() == 0


# ---- 6: a flood ---------------------------------------------------------------------------------------------------
FLOODER = """
import json, sys, time, numpy as np, zmq
from daemon.cli.clients import events_of
from daemon.data.datasets import read_recordings
from daemon.protocol import encode_ingest
from pathlib import Path
rec = read_recordings(Path(sys.argv[2]))
msgs = [encode_ingest(e) for e in events_of(rec, "flood", 0, False)]
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)  # sends and never reads an ack
s.setsockopt(zmq.SNDHWM, 100)
s.setsockopt(zmq.LINGER, 60_000)
s.connect(sys.argv[1])
n, blocked, t0 = int(sys.argv[3]), 0.0, time.monotonic()
for i in range(n):
    frames = list(msgs[i % len(msgs)])
    header = json.loads(frames[1]); header["seq"] = i; frames[1] = json.dumps(header).encode()
    t = time.monotonic()
    s.send_multipart(frames)  # blocks when the daemon does not take more: backpressure
    blocked += time.monotonic() - t
    if (i + 1) % 50 == 0:
        print(json.dumps({"progress": i + 1}), flush=True)
print(json.dumps({"sent": n, "seconds": time.monotonic() - t0, "blocked_s": blocked}), flush=True)
sys.stdin.readline()  # stay connected until the test has seen everything stored: ZeroMQ drops the unread input
s.close()             # of a connection that closes, so a sender that cannot read acks must not hang up early
ctx.term()
"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def message_bytes(sim: Path) -> int:
    """The size of the smallest ingest message made from ``sim`` (bytes, all frames)."""
    from daemon.protocol import encode_ingest

    return min(sum(len(f) for f in encode_ingest(e)) for e in events_of(read_recordings(sim), "flood", 0, False))


def queued_at_most(sender_hwm: int, daemon_hwm: int, batch: int, size: int) -> int:
    """Messages of ``size`` bytes that can sit between a sender and the store: both ZeroMQ queues, a micro-batch,
    and what the kernel's send and receive buffers of one loopback connection hold at their largest."""
    kernel = sum(int(Path(f"/proc/sys/net/ipv4/tcp_{d}").read_text().split()[2]) for d in ("wmem", "rmem"))
    return sender_hwm + daemon_hwm + batch + kernel // size + 1


@pytest.mark.slow
def test_a_flood_gets_backpressure_and_memory_stays_bounded(tmp_path, sim, model):
    # twice what the queues between the sender and the store can hold, so that a sender without backpressure
    # would get further ahead than they allow
    bound = queued_at_most(100, 200, 256, message_bytes(sim))
    n = 2 * bound
    cfg = config(tmp_path / "c.toml", ingest="queue_per_sender = 200")
    d = Daemon(tmp_path / "state", cfg, "--model", str(model))
    try:
        before = rss_mib(d.proc.pid)
        flood = subprocess.Popen(
            [sys.executable, "-c", FLOODER, d.ingest, str(sim), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert flood.stdout is not None and flood.stdin is not None
        peak, progress, line = before, [0], []

        def read_report() -> None:
            for text in flood.stdout:
                if "progress" not in (msg := json.loads(text)):
                    line.append(msg)
                    return
                progress[0] = msg["progress"]

        reader = threading.Thread(target=read_report, daemon=True)
        reader.start()
        # How far the sender gets ahead of the store, counted in events, not timed: with backpressure it can be
        # ahead by no more than the queues between them hold, however fast either side is. The stored count is
        # read first, the sender's count after it, so the lead is never underestimated.
        deadline, ahead = time.monotonic() + 180, 0
        while reader.is_alive() and time.monotonic() < deadline:
            peak = max(peak, rss_mib(d.proc.pid))
            stored = metric(d.metrics, "wingbeat_events_stored_total")
            ahead = max(ahead, progress[0] - int(stored))
            time.sleep(0.05)
        report = line[0]
        t_sent = time.monotonic()
        while metric(d.metrics, "wingbeat_events_stored_total") < n and time.monotonic() < deadline:
            peak = max(peak, rss_mib(d.proc.pid))
            time.sleep(0.1)
        assert metric(d.metrics, "wingbeat_events_stored_total") == n
        t_done = time.monotonic()
        flood.stdin.write("done\n")
        flood.stdin.flush()
        assert flood.wait(30) == 0
        rate = n / report["seconds"]
        assert d.proc.poll() is None
        # backpressure, not an unbounded queue: never further ahead than the sender's queue, the daemon's queue, a
        # micro-batch and what loopback TCP buffers hold (each side's kernel buffer caps, /proc/sys/net/ipv4)
        assert ahead <= bound, (ahead, bound, report)
        # bounded: 200 queued messages, a micro-batch in flight, features; not the whole flood
        assert peak - before < 150, (before, peak)
        wait_for(lambda: d.status()["outputs"] == n, timeout=60)
    finally:
        assert d.stop() == 0
    print(
        f"flood: {n} events in {report['seconds']:.1f} s ({rate:.0f}/s), sender blocked {report['blocked_s']:.1f} s,"
        f" at most {ahead} events ahead of the store; daemon RSS {before:.0f} → peak {peak:.0f} MiB"
    )
    flooded = {("flood", seq) for seq in range(report["sent"])}  # the flooder's sequence numbers; it reads no acks
    counts = figures(d.state, flooded, flooded)
    record("flood (sender ignores acks)", "DEALER sending flat out", report["sent"], counts, None, t_done - t_sent)


# ---- hostile input: a socket-level fuzzer on both endpoints --------------------------------------------------------
CAP = 65_536  # ingest.max_message_bytes in the fuzz test: oversize messages stay cheap to make


def malformed(rng: random.Random, i: int) -> tuple[str, list[bytes]]:
    """One message that must be refused, and the reason it must be refused for."""
    good = {"v": 1, "sensor": "fz", "seq": i, "t0_ns": 1, "fs": 20_800, "dtype": "int16", "shape": [1, 256]}
    payload = np.sin(np.arange(256) / 3.0 * (1 + i % 7)).__mul__(9000).astype("<i2").tobytes()

    def msg(header: object, data: bytes = payload, topic: bytes = b"rec.fz") -> list[bytes]:
        return [topic, json.dumps(header).encode(), data]

    kind = rng.randrange(16)
    if kind == 0:
        return "json", [b"rec.fz", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) + b"\xff", payload]
    if kind == 1:
        return "json", [b"rec.fz", rng.choice([b"[1, 2]", b'"x"', b"null", b"3", b"{", b""]), payload]
    if kind == 2:
        frames = [b"rec.fz", json.dumps(good).encode(), payload, b"", b"x"]
        return "frames", rng.choice([frames[:1], frames[:2], frames[:4], frames, [b""] * rng.choice([1, 2, 4, 7])])
    if kind == 3:
        return "topic", msg(
            good, topic=rng.choice([b"rec.other", b"cluster.fz", b"", b"rec.", b"rec.fz\xff", b"x" * 99])
        )
    if kind == 4:
        return "dtype", msg({**good, "dtype": rng.choice(["int8", "complex64", ">i2", "", "float16", "Int16"])})
    if kind == 5:
        return "too_many_samples", msg({**good, "shape": [1, rng.choice([10**9, 10**12, 2**62])]})
    if kind == 6:
        return "too_many_channels", msg({**good, "shape": [rng.choice([9, 64, 10**6]), 256]})
    if kind == 7:
        return "too_many_channels", msg({**good, "shape": [rng.choice([0, -1, -(2**40)]), 256]})
    if kind == 8:
        return "too_few_samples", msg({**good, "shape": [1, rng.choice([-5, 0, 10, -(2**40)])]})
    if kind == 9:
        cut = rng.choice([-3, -2, -1, 1, 2, 100])
        return "length", msg(good, payload[:cut] if cut < 0 else payload + b"\0" * cut)
    if kind == 10:
        x = np.sin(np.arange(256, dtype="<f4"))
        x[rng.randrange(256)] = rng.choice([np.nan, np.inf, -np.inf])
        return "non_finite", msg({**good, "dtype": "float32"}, x.astype("<f4").tobytes())
    if kind == 11:
        return "version", msg({**good, "v": rng.choice([0, 2, "1", None, 1.5, True])})
    if kind == 12:
        bad = rng.choice([("seq", "x"), ("seq", -1), ("fs", -1), ("fs", "20k"), ("t0_ns", 1.5), ("sensor", "a/b")])
        return "header", msg({**good, bad[0]: bad[1]})
    if kind == 13:
        return "header", msg({**good, "extra": rng.random()})
    if kind == 14 and i % 20 == 0:  # above the cap, below ZeroMQ's wall: read, refused, counted
        return "oversize", msg(good, payload + b"\0" * (CAP + rng.randrange(1000)))
    return "featurise", msg(good, np.zeros(256, "<i2").tobytes() + b"")  # decodes; no spectrum of a constant


@pytest.mark.slow
def test_ten_thousand_hostile_messages_on_both_endpoints(tmp_path, sim, model):
    n = 10_000
    rng = random.Random(11)
    cfg = config(
        tmp_path / "c.toml",
        ingest=f'plain_endpoint = "tcp://127.0.0.1:{free_ports(1)[0]}"\n'
        f"max_message_bytes = {CAP}\nquarantine_keep = 4000",
    )
    d = Daemon(tmp_path / "state", cfg, "--model", str(model))
    ctx = zmq.Context.instance()
    dealer, push = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUSH)
    for sock, endpoint in ((dealer, d.ingest), (push, d.ingest_plain)):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    expected: dict[str, int] = {}
    acks: dict[str, int] = {}
    acked_stored: set[Key] = set()  # acks that promised to keep a message (none may)

    def count_ack(body: dict) -> None:
        acks[body["status"]] = acks.get(body["status"], 0) + 1
        if body["status"] != "rejected":
            acked_stored.add((body.get("sensor"), body.get("seq")))

    try:
        t = time.monotonic()
        for i in range(n):
            reason, frames = malformed(rng, i)
            expected[reason] = expected.get(reason, 0) + 1
            (dealer if i % 2 else push).send_multipart(frames)
            while dealer.poll(0):
                count_ack(json.loads(dealer.recv_multipart()[1]))
        wait_for(lambda: metric(d.metrics, "wingbeat_events_rejected_total") >= n, timeout=120)
        while dealer.poll(1000):
            count_ack(json.loads(dealer.recv_multipart()[1]))
        took = time.monotonic() - t
        body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        counted = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith("wingbeat_events_rejected_total{") and not line.endswith(" 0.0")
        }
        assert counted == {k: float(v) for k, v in expected.items()}  # every one, under the reason it deserves
        assert acks == {"rejected": n // 2}  # each message on the ack endpoint got its refusal, none was stored
        assert metric(d.metrics, "wingbeat_events_stored_total") in (-1.0, 0.0)
        # quarantine holds them, bounded by ingest.quarantine_keep rows of at most quarantine_frame_bytes each
        wait_for(lambda: metric(d.metrics, "wingbeat_quarantine_rows") == 4000, timeout=30)

        # beyond ZeroMQ's wall (2 × cap + 64 KiB) the connection is dropped before anything is read; the daemon lives
        huge = ctx.socket(zmq.DEALER)
        huge.setsockopt(zmq.LINGER, 0)
        huge.connect(d.ingest)
        huge.send_multipart([b"rec.fz", b"{}", b"\0" * (3 * CAP + 65_536)])
        time.sleep(1)
        huge.close()

        # and a valid stream still goes through in full
        rec = read_recordings(sim)
        res = replay(events_of(rec, "after", 0, False), d.ingest, window=64, give_up_s=60)
        assert (res.acked, res.unacked, res.rejected) == (len(rec), 0, {})
        wait_for(lambda: d.status()["outputs"] == len(rec), timeout=60)
        assert d.proc.poll() is None
    finally:
        dealer.close()
        push.close()
        assert d.stop() == 0
    db = sqlite3.connect(f"file:{d.state / DB_NAME}?mode=ro", uri=True)
    rows, biggest, endpoints = db.execute(
        "SELECT count(*), max(length(frames)), count(DISTINCT endpoint) FROM quarantine"
    ).fetchone()
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    assert rows == 4000 and biggest <= 65_536 and endpoints == 2
    print(f"fuzz: {n} messages in {took:.1f} s, by reason {dict(sorted(expected.items()))}")
    # none of the messages is a valid event: what the store holds of sensor "fz" (the fuzzer's) must be nothing,
    # and lost counts what was acked as stored yet is missing
    fuzzed = {("fz", i) for i in range(n)}
    counts = figures(d.state, fuzzed, acked_stored)
    assert counts["stored"] == 0, counts
    record("10,000 malformed messages", "fuzzer, both endpoints", n, counts, acks.get("duplicate", 0), took)
