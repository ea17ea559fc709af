"""The reference clients (``wingbeat replay``, ``wingbeat tail``) against real sockets: no daemon at all, ZeroMQ's
send queue full, a daemon that comes up late. Every wait has a timeout, and the clients' own must hold."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zmq
from harness import Daemon, cli, simulate

from daemon.cli.clients import events_of, replay, tail
from daemon.data.datasets import read_recordings

N = 300  # events in the simulated set


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, N, 3, 4)


def free_port() -> int:
    """A loopback port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replay_to_a_port_with_no_daemon_gives_up_on_time(sim):
    """Every event taken fits in ZeroMQ's queue; none is acked; ``give_up_s`` holds."""
    rec = read_recordings(sim)
    t = time.monotonic()
    res = replay(events_of(rec, "s", 0, False), f"tcp://127.0.0.1:{free_port()}", window=N + 10, give_up_s=2)
    took = time.monotonic() - t
    assert 2 <= took < 5, took
    assert (res.acked, res.unacked, res.rejected, res.duplicates) == (0, N, {}, 0)
    assert res.sent + res.deferred >= N and res.sent <= N


def test_replay_whose_resends_fill_the_send_queue_never_blocks(sim):
    """A short ack timeout resends the window every turn: ZeroMQ's queue (1,000 messages) fills within about a
    second, and a blocking send would never return. The refused sends are counted and the give-up still holds."""
    rec = read_recordings(sim)
    t = time.monotonic()
    res = replay(
        events_of(rec, "s", 0, False),
        f"tcp://127.0.0.1:{free_port()}",
        window=64,
        ack_timeout_s=0.01,
        give_up_s=4,
    )
    took = time.monotonic() - t
    assert 4 <= took < 8, took
    assert res.deferred > 0 and res.sent + res.resent >= 1000  # the queue was full: those sends would have blocked
    assert (res.acked, res.unacked, res.sent) == (0, 64, 64)


def test_replay_arguments_that_could_spin_or_hang_are_refused():
    for kwargs, message in [
        ({"ack_timeout_s": 0.0}, "ack_timeout_s"),
        ({"give_up_s": -1.0}, "give_up_s"),
        ({"window": 0}, "window"),
        ({"rate": float("nan")}, "rate"),
    ]:
        with pytest.raises(ValueError, match=message):
            replay(iter([]), "tcp://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


@pytest.mark.slow
def test_events_held_while_no_daemon_are_sent_when_it_comes_up(tmp_path, sim):
    """A replay started before the daemon: its queue fills and events wait, unsent; the daemon starts on that port
    and every event is acked (the copies queued meanwhile come back as duplicates)."""
    rec = read_recordings(sim)
    port_in, port_pub = free_port(), free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[ingest]\nendpoint = "tcp://127.0.0.1:{port_in}"\n[publish]\nendpoint = "tcp://127.0.0.1:{port_pub}"\n'
        '[metrics]\nlisten = "127.0.0.1:0"\n[training]\nfirst_after = 100000\n'
    )
    pool = ThreadPoolExecutor(1)
    sending = pool.submit(
        replay,
        events_of(rec, "late", 0, False),
        f"tcp://127.0.0.1:{port_in}",
        window=64,
        ack_timeout_s=0.05,
        give_up_s=60,
    )
    pool.shutdown(wait=False)
    time.sleep(2)
    assert not sending.done()
    d = Daemon(tmp_path / "state", cfg)
    try:
        res = sending.result(timeout=120)
        assert (res.acked, res.unacked, res.rejected, res.sent) == (N, 0, {}, N)
        assert res.deferred > 0  # some waited for ZeroMQ while the daemon was down
        assert d.status()["events"] == N
    finally:
        assert d.stop() == 0


def test_cli_replay_to_a_closed_port_exits_within_give_up(sim):
    t = time.monotonic()
    r = cli("replay", str(sim), "--connect", f"tcp://127.0.0.1:{free_port()}", "--give-up", "2", "--json", timeout=60)
    took = time.monotonic() - t
    assert r.returncode == 1, r.stderr
    body = json.loads(r.stdout.strip().splitlines()[-1])
    assert body["acked"] == 0 and body["unacked"] == 256  # the default window, all taken, none acked
    assert took < 30, took  # the interpreter's start-up included


def test_tail_with_no_publisher_stops_after_its_timeout():
    t = time.monotonic()
    got: list[dict] = []
    assert tail(f"tcp://127.0.0.1:{free_port()}", "cluster.", 0, 0.5, got.append) == 0
    assert 0.5 <= time.monotonic() - t < 3 and got == []
    with pytest.raises(ValueError, match="timeout_s"):
        tail("tcp://127.0.0.1:1", "cluster.", 0, 0.0, got.append)


def test_tail_emits_json_objects_skips_the_rest_and_stops_at_count():
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    got: list[dict] = []
    pool = ThreadPoolExecutor(1)
    following = pool.submit(tail, f"tcp://127.0.0.1:{port}", "cluster.", 2, 10.0, got.append)
    pool.shutdown(wait=False)
    try:
        deadline = time.monotonic() + 10
        while not following.done() and time.monotonic() < deadline:  # until the subscription has arrived
            pub.send_multipart([b"other.x", b'{"n": -1}'])
            pub.send_multipart([b"cluster.x", b"not json"])
            pub.send_multipart([b"cluster.x", b"[1, 2]"])
            pub.send_multipart([b"cluster.x", json.dumps({"n": len(got)}).encode()])
            time.sleep(0.05)
        assert following.result(timeout=5) == 2
        assert len(got) == 2 and all(set(g) == {"n"} and g["n"] >= 0 for g in got)
    finally:
        pub.close()
