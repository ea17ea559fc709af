"""Poison messages on both paths, against real processes: one hostile message amid a normal stream never stops the
daemon or the centre, never costs a good event, and is quarantined with its reason (answered as rejected on
ZeroMQ, terminated on JetStream: never redelivered). Each named case is a row of `make faults`' table.

The store's own last line of defence (an event the codec let through that SQLite cannot hold) is tested first,
without processes: only a codec bug reaches it, so no message on the wire can show it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from functools import reduce
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import CONFIG, ROOT, Daemon, simulate, wait_for

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.net.wire import encode_event
from daemon.protocol import REFUSED, Event, Quarantined, Received, decode_ack, encode_ingest
from daemon.serve.pipeline import Processed, settle
from daemon.store.db import DB_NAME, Store

TABLE = Path(os.environ["WINGBEAT_FAULTS_TABLE"]) if os.environ.get("WINGBEAT_FAULTS_TABLE") else None
NATS = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
GOOD = 40  # good events sent around each poison message
QUIET = CONFIG.replace("first_after = 240", "first_after = 100000")  # no training: these tests are about input


def deep(depth: int) -> object:
    return reduce(lambda v, _: [v], range(depth), 0)


# ---- the store's last line: one event it cannot hold is quarantined, the batch stored, the loop never stopped ----
def test_an_event_the_store_cannot_hold_is_quarantined_and_acked_as_rejected(tmp_path):
    x = np.arange(64, dtype="<i2").reshape(1, 64)

    def ev(seq: int, **kw) -> Event:
        return Event("s1", seq, 5, 1000.0, "int16", 1, x, **kw)

    events = [ev(0), ev(1, label="\ud800"), ev(2), ev(2**64), ev(4, meta={"m": deep(10_000)}), ev(5)]
    store = Store(tmp_path)
    reject = Quarantined("json", "bad \udfff detail", "s1", 9, b"\x00", "ack")  # even a reject row that cannot be
    ids = store.ingest(events, [np.ones((1, 4), np.float32)] * 6, [reject], keep_raw=True)
    assert [i > 0 for i in ids] == [True, False, True, False, False, True]
    assert [ids[k] for k in (1, 3, 4)] == [REFUSED] * 3
    q = store.db.execute("SELECT reason, detail, seq FROM quarantine ORDER BY id").fetchall()
    assert sorted(r[0] for r in q) == ["json", "store", "store", "store"]
    details = " ".join(r[1] for r in q)
    assert "UnicodeEncodeError" in details and "OverflowError" in details and "RecursionError" in details
    counts = [store.db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "features", "raw")]
    assert counts == [3, 3, 3]  # nothing of a refused event is left behind
    # the pipeline answers each refused event as rejected ("store"), the others as stored
    received = [Received([b""], b"peer", 0.0, "ack") for _ in events]
    p = Processed(list(zip(received, events, strict=True)), [np.ones(4)] * 6, [], [], [], None)
    s = settle(p, ids)
    assert [a.status for a in s.acks] == ["stored", "rejected", "stored", "rejected", "rejected", "stored"]
    assert {a.reason for a in s.acks if a.status == "rejected"} == {"store"} and len(s.refused) == 3
    # a disk or locking error is not an event's: it still raises, and nothing of the batch is stored
    other = sqlite3.connect(tmp_path / DB_NAME)
    other.execute("BEGIN IMMEDIATE")
    store.db.execute("PRAGMA busy_timeout = 50")
    with pytest.raises(sqlite3.OperationalError):
        store.ingest([ev(6), ev(7, label="\ud800")], [np.ones((1, 4), np.float32)] * 2, [], keep_raw=True)
    other.rollback()
    other.close()
    assert store.db.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    store.close()


# ---- the table ----------------------------------------------------------------------------------------------------
def record(fault: str, how: str, good: int, stored: int, recover_s: float) -> None:
    row = {"fault": fault, "how": how, "sent": good + 1, "stored": stored, "duplicates": 0}
    row |= {"lost": good - stored, "acked_as_duplicate": None, "recover_s": round(recover_s, 2)}
    print("FAULT", json.dumps(row))
    if TABLE is not None:
        with open(TABLE, "a") as f:
            f.write(json.dumps(row) + "\n")
    assert row["lost"] == 0, row


def held(state: Path, sql: str, *args: object) -> int:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    try:
        return int(db.execute(sql, args).fetchone()[0])
    finally:
        db.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 200, 2, 5)


def sending(rec, endpoint: str, sensor: str) -> threading.Thread:
    """A normal replay of ``GOOD`` events in a thread, paced so that the poison message lands amid it."""
    events = islice(events_of(rec, sensor, 0, False), GOOD)
    t = threading.Thread(target=replay, args=(events, endpoint, 100.0, 16, 2.0, 30.0), daemon=True)
    t.start()
    return t


# ---- ZeroMQ: a real daemon ------------------------------------------------------------------------------------------
def zmq_poison(seq: int, change: dict | None = None, text: tuple[str, str] | None = None) -> list[bytes]:
    x = np.arange(2 * 128, dtype="<i2").reshape(2, 128) % 50
    frames = encode_ingest(Event("poison", seq, 1_700_000_000_000_000_000, 20_800.0, "int16", 2, x, "Aedes"))
    header = {**json.loads(frames[1]), **(change or {})}
    raw = json.dumps(header)
    if text is not None:  # a value written verbatim as JSON text (numbers json.dumps would not write)
        key, value = text
        raw = raw.replace(f'"{key}": {json.dumps(header[key])}', f'"{key}": {value}', 1)
        assert value in raw
    return [frames[0], raw.encode(), frames[2]]


ZMQ_CASES = {  # name: (frames, the reject's reason)
    "lone surrogate in label": (zmq_poison(1, {"label": "\ud800"}), "encoding"),
    "lone surrogate in meta": (zmq_poison(2, {"meta": {"note": "\udfff"}}), "encoding"),
    "seq 2^64": (zmq_poison(2**64), "header"),
    "t0_ns 2^64": (zmq_poison(4, {"t0_ns": 2**64}), "header"),
    "fs as a 400-digit integer": (zmq_poison(5, text=("fs", "9" * 400)), "header"),
    "fs NaN": (zmq_poison(6, text=("fs", "NaN")), "header"),
    "meta 20 deep": (zmq_poison(7, text=("label", '"x", "meta": {"m": ' + "[" * 20 + "0" + "]" * 20 + "}")), "nesting"),
    "meta 5,000 deep": (zmq_poison(8, text=("label", '"x", "meta": {"m": ' + "[" * 5000 + "]" * 5000 + "}")), "json"),
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zmq")
    (tmp / "d.toml").write_text(QUIET)
    d = Daemon(tmp / "state", tmp / "d.toml")
    yield d
    if d.proc.poll() is None:
        assert d.stop() == 0, d.logs()[-3000:]


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(ZMQ_CASES))
def test_zeromq_poison_is_rejected_quarantined_and_stops_nothing(daemon, sim, case):
    frames, reason = ZMQ_CASES[case]
    rec = read_recordings(sim)
    sensor = f"good-{sorted(ZMQ_CASES).index(case)}"
    q0 = held(daemon.state, "SELECT count(*) FROM quarantine WHERE reason = ?", reason)
    t = sending(rec, daemon.ingest, sensor)
    time.sleep(0.1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.ingest)
    start = time.monotonic()
    try:
        sock.send_multipart(frames)
        assert sock.poll(15_000), "no answer to the poison message"
        ack = decode_ack(sock.recv_multipart())
    finally:
        sock.close()
    assert ack is not None and ack["status"] == "rejected" and ack["reason"] == reason, ack
    t.join(60)
    assert not t.is_alive()
    stored = wait_for(
        lambda: (n := held(daemon.state, "SELECT count(*) FROM events WHERE sensor = ?", sensor)) >= GOOD and n, 30
    )
    recovered = time.monotonic() - start
    assert daemon.proc.poll() is None, daemon.logs()[-3000:]
    assert held(daemon.state, "SELECT count(*) FROM quarantine WHERE reason = ?", reason) == q0 + 1
    record(f"poison on ZeroMQ: {case}", f"amid a replay; rejected ack '{reason}', quarantined, daemon up",
           GOOD, stored, recovered)  # fmt: skip


# ---- NATS: a real nats-server with JetStream, a station and `wingbeat central` --------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nats:
    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http = free_port(), free_port()
        conf = work / "nats.conf"
        lines = [f"listen: 127.0.0.1:{self.port}", f"http: 127.0.0.1:{self.http}"]
        lines.append(f'jetstream {{ store_dir: "{work}/js" }}')
        conf.write_text("\n".join(lines) + "\n")
        self.url = f"nats://127.0.0.1:{self.port}"
        assert NATS is not None
        self.proc = subprocess.Popen([NATS, "-c", str(conf)], stdout=open(work / "log", "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/healthz?js-enabled-only=true") is not None, 30)

    def get(self, path: str) -> dict | None:
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5).read())
        except OSError:
            return None

    def consumer(self) -> dict:
        info = self.get("/jsz?consumers=true&config=true") or {}
        streams = [s for a in info.get("account_details", []) for s in a.get("stream_detail", [])]
        return {"messages": sum(s["state"]["messages"] for s in streams),
                **next((c for s in streams for c in s.get("consumer_detail", [])), {})}  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


class Centre(Daemon):
    def __init__(self, state: Path, config: Path, nats: str) -> None:
        self.state = state
        self.log = open(state.parent / f"{state.name}.log", "a")
        cmd = [sys.executable, "-m", "daemon.cli", "central", "--nats", nats, "--state", str(state)]
        cmd += ["--config", str(config), "--first-training-after", "100000"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        info = wait_for(lambda: self._endpoints(), 60)
        self.ingest, self.publish, self.metrics = info["ingest"], info["publish"], info["metrics"]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    if NATS is None:
        pytest.skip("nats-server is not installed (make test-deps installs it)")
    tmp = tmp_path_factory.mktemp("nats")
    nats = Nats(tmp / "nats")
    (tmp / "c.toml").write_text(QUIET)
    (tmp / "s.toml").write_text(QUIET + f'\n[network]\nnats = "{nats.url}"\nstation = "s1"\n')
    procs: list[Daemon] = []
    try:
        procs.append(Centre(tmp / "centre", tmp / "c.toml", nats.url))
        procs.append(Daemon(tmp / "s1", tmp / "s.toml"))
        yield nats, procs[0], procs[1]
    finally:
        for d in procs:
            if d.proc.poll() is None:
                assert d.stop() == 0, d.logs()[-3000:]
        nats.stop()


def nats_poison(features: dict, seq: int, change: dict | None, text: tuple[str, str] | None, nan: bool) -> bytes:
    row = (0, "poison", seq, 5, 20_800.0, "int16", 1, 64, "", "{}", np.ones(8, np.float32).tobytes(), None)
    _, body, _ = encode_event("s1", row, features)
    n = int.from_bytes(body[:4], "big")
    header = {**json.loads(body[4 : 4 + n]), **(change or {})}
    raw = json.dumps(header)
    if text is not None:
        raw = raw.replace(f'"{text[0]}": {json.dumps(header[text[0]])}', f'"{text[0]}": {text[1]}', 1)
        assert text[1] in raw
    h = raw.encode()
    rest = np.r_[np.ones(7), np.nan].astype("<f4").tobytes() if nan else body[4 + n :]
    return len(h).to_bytes(4, "big") + h + rest


NATS_CASES = {  # name: (seq, header change, JSON text, message ID or None: the right one, the reason)
    "lone surrogate in label": (1, {"label": "\ud800"}, None, None, "encoding"),
    "seq 2^64": (2**64, None, None, "s1/poison/2", "header"),
    "fs as a 400-digit integer": (3, None, ("fs", "9" * 400), None, "header"),
    "channels 2^64": (4, {"channels": 2**64}, None, None, "header"),
    "meta 7,000 deep": (5, None, ("meta", '{"m": ' + "[" * 7000 + "]" * 7000 + "}"), None, "json"),
    "NaN features": (6, {"nan": True}, None, None, "features"),
    "body names another station": (7, {"station": "s2"}, None, "s2/poison/7", "subject"),
    # the ID of the real station's last good event of this case, published before it: were the ID trusted by the
    # server's de-duplication, that event would be dropped and the case would count one lost
    "forged Nats-Msg-Id": (8, None, None, "FORGED", "subject"),
    "not an event message": (9, None, None, None, "frame"),
}


def publish(url: str, subject: str, body: bytes, msg_id: str) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(url, connect_timeout=5)
        try:
            await nc.jetstream().publish(subject, body, timeout=5, headers={"Nats-Msg-Id": msg_id})
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(NATS_CASES))
def test_nats_poison_is_quarantined_terminated_and_stops_nothing(network, sim, case):
    nats, centre, station = network
    seq, change, text, mid, reason = NATS_CASES[case]
    features = wait_for(lambda: json.loads(held_text(centre.state, "features") or "null"), 30)
    nan = change == {"nan": True}
    body = b"junk" if reason == "frame" else nats_poison(features, seq, None if nan else change, text, nan)
    sensor = f"good-{sorted(NATS_CASES).index(case)}"
    q0 = held(centre.state, "SELECT count(*) FROM quarantine WHERE reason = ? AND endpoint = 'nats'", reason)
    t = sending(read_recordings(sim), station.ingest, sensor)
    time.sleep(0.2)
    start = time.monotonic()
    if mid == "FORGED":
        mid = f"s1/{sensor}/{GOOD - 1}"
    publish(nats.url, "wingbeat.events.s1.poison", body, mid or f"s1/poison/{seq}")
    t.join(60)
    assert not t.is_alive()
    sql = "SELECT count(*) FROM events WHERE station = 's1' AND sensor = ?"
    stored = wait_for(lambda: (n := held(centre.state, sql, sensor)) >= GOOD and n, 60)
    wait_for(lambda: held(centre.state, "SELECT count(*) FROM quarantine WHERE reason = ?", reason) > q0, 30)
    recovered = time.monotonic() - start
    # terminated, not pending: JetStream will not bring it back after ack_wait, and the work queue is empty
    c = wait_for(lambda: (c := nats.consumer()) and c.get("num_ack_pending") == 0 and c["messages"] == 0 and c, 30)
    assert c["config"]["max_deliver"] > 0
    assert centre.proc.poll() is None and station.proc.poll() is None, centre.logs()[-3000:]
    assert held(centre.state, "SELECT count(*) FROM quarantine WHERE reason = ?", reason) == q0 + 1
    record(f"poison on NATS: {case}", f"on the stream amid a station's events; quarantined '{reason}', "
           "terminated, centre up", GOOD, stored, recovered)  # fmt: skip


def held_text(state: Path, key: str) -> str | None:
    try:
        db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None
    except sqlite3.OperationalError:
        return None
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["tls:// URL", "tls_ca"])
def test_tls_or_no_connection_a_plain_server_is_refused(network, sim, tmp_path, how):
    """nats-py alone talks plain TCP to a server that does not ask for TLS: the station refuses such a connection,
    says why, and keeps its events in the outbox."""
    nats, centre, _ = network
    extra = f'nats = "tls://127.0.0.1:{nats.port}"\n'
    if how == "tls_ca":
        ca = tmp_path / "ca.pem"
        key = str(tmp_path / "k")
        cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", str(ca)]
        subprocess.run([*cmd, "-subj", "/CN=wingbeat-test", "-days", "1"], check=True, capture_output=True)
        extra = f'nats = "{nats.url}"\ntls_ca = "{ca}"\n'
    name = "t1" if how == "tls_ca" else "t2"
    (tmp_path / "t.toml").write_text(QUIET + f'\n[network]\nstation = "{name}"\n{extra}')
    d = Daemon(tmp_path / name, tmp_path / "t.toml")
    try:
        events = islice(events_of(read_recordings(sim), "trap", 0, False), 10)
        assert replay(events, d.ingest, 0.0, 16, 2.0, 30.0).acked == 10
        refused = wait_for(lambda: [e for e in d.events() if e.get("event") == "network_refused_plaintext"], 30)
        assert "TLS" in refused[0]["error"] and nats.url.split("//")[1] in refused[0]["nats"]
        time.sleep(2.0)
        m = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert "wingbeat_network_connected 0.0" in m and "wingbeat_outbox_events 10.0" in m, m[-2000:]
        assert held(centre.state, "SELECT count(*) FROM events WHERE station = ?", name) == 0
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.logs()[-3000:]
