"""CURVE on ingest and publish, for real: the daemon process, real ZeroMQ sockets with real keys. An allowed client
gets through; an unknown key and a plaintext client are refused, counted, and nothing they send is stored."""

from __future__ import annotations

import json
import re
import stat
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
from harness import Daemon, cli, wait_for

from daemon.cli.clients import Curve, events_of, replay
from daemon.data.datasets import read_recordings
from daemon.ops.security import secure_client
from daemon.protocol import encode_ingest


def keys(out: Path, name: str) -> tuple[Path, Path]:
    r = cli("keys", "--out", str(out), "--name", name)
    assert r.returncode == 0, r.stderr
    return out / f"{name}.key", out / f"{name}.key_secret"


def test_keys_makes_a_private_pair_and_never_overwrites(tmp_path):
    public, secret = keys(tmp_path, "gateway")
    assert "public-key" in public.read_text() and "secret-key" not in public.read_text()
    assert "secret-key" in secret.read_text()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    before = secret.read_text()
    r = cli("keys", "--out", str(tmp_path), "--name", "gateway")
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert secret.read_text() == before


def test_curve_config_needs_its_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[security]\ncurve = true\n")
    r = cli("check-config", str(cfg))
    assert r.returncode == 2 and "security.server_secret_key: must be set" in r.stderr

    # keys that are named but missing or wrong: the daemon refuses to start, in one line
    public, _ = keys(tmp_path / "k", "server")
    (tmp_path / "clients").mkdir()
    cfg.write_text(
        f'[security]\ncurve = true\nserver_secret_key = "{public}"\nclients_dir = "{tmp_path / "clients"}"\n'
    )
    r = cli("run", "--config", str(cfg), "--state", str(tmp_path / "s"), "--metrics", "")
    assert r.returncode == 2 and "holds no secret key" in r.stderr, r.stderr
    cfg.write_text(
        f'[security]\ncurve = true\nserver_secret_key = "{tmp_path / "k" / "server.key_secret"}"\n'
        f'clients_dir = "{tmp_path / "clients"}"\n'
    )
    r = cli("run", "--config", str(cfg), "--state", str(tmp_path / "s"), "--metrics", "")
    assert r.returncode == 2 and "holds no client public keys" in r.stderr, r.stderr


def refused(metrics: str, socket: str, reason: str) -> float:
    body = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10).read().decode()
    m = re.search(rf'wingbeat_connections_refused_total{{reason="{reason}",socket="{socket}"}} (\S+)', body)
    return float(m.group(1)) if m else 0.0


def sub(endpoint: str, curve: Curve | None) -> zmq.Socket[bytes]:
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        secure_client(sock, curve.client_secret, curve.server_public)
    sock.setsockopt(zmq.SUBSCRIBE, b"cluster.")
    sock.connect(endpoint)
    return sock


def received(sock: zmq.Socket[bytes], seconds: float) -> list[dict]:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sock.poll(100):
            out.append(json.loads(sock.recv_multipart()[-1]))
    return out


@pytest.mark.slow
def test_only_allowed_keys_get_in_or_out(tmp_path):
    sim = tmp_path / "sim.npz"
    assert cli("simulate", "--out", str(sim), "--events", "120", "--species", "2", "--seed", "3").returncode == 0
    rec = read_recordings(sim)
    server_pub, server_sec = keys(tmp_path / "server", "server")
    allowed = tmp_path / "allowed"
    _, alice = keys(allowed, "alice")  # alice's public key goes into the allowed directory
    _, mallory = keys(tmp_path / "strangers", "mallory")
    cfg = tmp_path / "wingbeat.toml"
    cfg.write_text(
        f"""
[ingest]
endpoint = "tcp://127.0.0.1:0"
plain_endpoint = "tcp://127.0.0.1:0"
[publish]
endpoint = "tcp://127.0.0.1:0"
[metrics]
listen = "127.0.0.1:0"
[training]
cpu_share = 1.0
first_after = 60
epochs_first = 5
[security]
curve = true
server_secret_key = "{server_sec}"
clients_dir = "{allowed}"
"""
    )
    d = Daemon(tmp_path / "state", cfg)
    try:
        good, bad = Curve(alice, server_pub), Curve(mallory, server_pub)
        sub_good, sub_bad, sub_plain = sub(d.publish, good), sub(d.publish, bad), sub(d.publish, None)

        # refused senders: nothing acked, nothing stored, each refusal counted by reason
        plain = replay(events_of(rec, "plain", 0, False), d.ingest, window=8, give_up_s=3)
        wait_for(lambda: refused(d.metrics, "ingest", "handshake") >= 1, timeout=10)
        stranger = replay(events_of(rec, "mallory", 0, False), d.ingest, window=8, give_up_s=3, curve=bad)
        wait_for(lambda: refused(d.metrics, "ingest", "key_not_allowed") >= 1, timeout=10)
        assert (stranger.acked, plain.acked) == (0, 0) and stranger.unacked == plain.unacked == 8

        # the same on the plain (PULL) endpoint: a PUSH without the keys is refused at the handshake
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 2000)
        push.connect(d.ingest_plain)
        ev = next(events_of(rec, "plainpush", 0, False))
        try:
            push.send_multipart(encode_ingest(ev))
        except zmq.Again:
            pass  # no peer ever completes the handshake, so there is nowhere to queue it: also refused
        wait_for(lambda: refused(d.metrics, "ingest_plain", "handshake") >= 1, timeout=10)
        push.close()

        # the allowed key: everything acked and stored; a first model trains and outputs reach allowed subscribers
        ok = replay(events_of(rec, "alice", 0, False), d.ingest, window=32, give_up_s=60, curve=good)
        assert (ok.acked, ok.unacked, ok.rejected) == (120, 0, {})
        st = d.status()
        assert st["events"] == 120 and st["per_sensor"] == {"alice": 120} and st["quarantine"] == {}
        wait_for(lambda: d.status()["outputs"] == 120, timeout=180, every=1)
        got = received(sub_good, 5)
        assert {g["event_id"] for g in got} == set(range(1, 121))
        assert received(sub_bad, 1) == [] and received(sub_plain, 1) == []
        assert refused(d.metrics, "publish", "key_not_allowed") >= 1
        assert refused(d.metrics, "publish", "handshake") >= 1
        for s in (sub_good, sub_bad, sub_plain):
            s.close()
    finally:
        assert d.stop() == 0
    logged = [e for e in d.events() if e.get("event") == "connection_refused"]
    assert {(e["socket"], e["reason"]) for e in logged} >= {("ingest", "key_not_allowed"), ("ingest", "handshake")}
