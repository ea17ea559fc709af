"""The real daemon process on random loopback ports, real ZeroMQ sockets, a real SQLite file. Every wait has a
timeout."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zmq
from harness import CONFIG, Daemon, Subscriber, cli, simulate, wait_for
from scipy.optimize import linear_sum_assignment

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.protocol import decode_ack
from daemon.store.db import Store
from daemon.store.versions import read_version
from model.predict import predict


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 320, 3, 1)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "wingbeat.toml"
    p.write_text(CONFIG)
    return p


@pytest.mark.slow
def test_from_empty_state_to_published_clusters_and_a_stable_retrain(tmp_path, sim):
    # Every retrain here must serve: what is tested is the swap, not the gate (tests/test_supervision.py refuses a
    # version end to end). A 60-epoch training on 320 events of 3 species can land on a poor latent (labelled ARI
    # 0.46 against its parent's 0.97 was seen), and which events it gets depends on the machine's load.
    config = tmp_path / "wingbeat.toml"
    config.write_text(CONFIG.replace("gate_ari_tolerance = 0.5", "gate_ari_tolerance = 2.0"))
    assert "gate_ari_tolerance = 2.0" in config.read_text()
    d = Daemon(tmp_path / "state", config)
    try:
        sub = Subscriber(d.publish)
        time.sleep(0.3)  # let the subscription reach the publisher
        rec = read_recordings(sim)
        res = replay(events_of(rec, "replay", 0, True), d.ingest, window=64, ack_timeout_s=10, give_up_s=60)
        assert (res.acked, res.unacked, res.rejected, res.duplicates) == (320, 0, {}, 0)
        # no model until 240 events: then the first training runs in the background and the backlog is published
        got = sub.drain(320, timeout=240)
        assert len(got) == 320
        assert sorted(g["event_id"] for g in got) == list(range(1, 321))  # every event once, none twice
        assert [g["event_id"] for g in got] == sorted(g["event_id"] for g in got)  # in arrival order
        assert all(len(g["latent"]) == 4 and g["model_version"] == 1 and "cluster" in g for g in got)
        st = d.status()
        assert st["events"] == 320 and st["outputs"] == 320 and st["serving"] == 1
        assert sum(st["per_cluster"].values()) == 320 and sum(st["per_sensor"].values()) == 320

        # resending everything: all acked as duplicates, nothing stored twice
        again = replay(events_of(rec, "replay", 0, True), d.ingest, window=64, ack_timeout_s=10, give_up_s=60)
        assert (again.acked, again.duplicates) == (320, 320)
        assert d.status()["events"] == 320

        # export agrees with what was sent
        csv_out = tmp_path / "out.csv"
        r = cli("export", "--state", str(d.state), "--out", str(csv_out))
        assert r.returncode == 0, r.stderr
        lines = csv_out.read_text().splitlines()
        assert len(lines) == 321 and lines[0].startswith("event_id,sensor,seq")

        # a retrain now, on the same data: version 2 serves and keeps the cluster IDs of version 1
        assert cli("retrain", "--state", str(d.state)).returncode == 0
        wait_for(lambda: d.status()["serving"] == 2, timeout=180, every=1)
        store = Store(d.state, readonly=True)
        ids, x, _ = store.training_set(1000)
        old = store.outputs_for(ids)
        store.close()
        new = predict(read_version(d.state / "models" / "v2"), x).cluster
        both = (old >= 0) & (new >= 0)
        same = np.mean(old[both] == new[both])
        # the best any relabelling of version 2's clusters could do on these events (two seeds of a short training
        # need not find the same partition): the IDs must reach it
        table = np.zeros((old.max() + 1, new.max() + 1))
        np.add.at(table, (old[both], new[both]), 1)
        rows, cols = linear_sum_assignment(table, maximize=True)
        assert same >= 0.99 * table[rows, cols].sum() / both.sum() and same > 0.5

        # another retrain while a second sensor streams every event twice, over two connections at once (an
        # instrument resending from a new socket): the swap loses nothing and stores nothing twice, and exactly one
        # copy of each event is acked as a duplicate
        assert cli("retrain", "--state", str(d.state)).returncode == 0
        with ThreadPoolExecutor(2) as pool:
            runs = [
                pool.submit(replay, events_of(rec, "live", 0, False), d.ingest, rate=60, window=64, give_up_s=60)
                for _ in range(2)
            ]
            a, b = (f.result(timeout=120) for f in runs)
        assert (a.acked, a.unacked, a.rejected, b.acked, b.unacked, b.rejected) == (320, 0, {}, 320, 0, {})
        assert a.duplicates + b.duplicates == 320
        wait_for(lambda: d.status()["serving"] == 3, timeout=180, every=1)
        got = sub.drain(640, timeout=60)
        assert sorted(g["event_id"] for g in got) == list(range(1, 641))
        st = d.status()
        assert st["events"] == 640 and st["outputs"] == 640 and st["per_sensor"] == {"live": 320, "sim-0": 320}
        versions = {g["model_version"] for g in got if g["sensor"] == "live"}
        assert versions <= {2, 3}

        # the metrics endpoint and health check
        body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert "wingbeat_events_stored_total" in body and "wingbeat_model_version 3.0" in body
        assert urllib.request.urlopen(f"http://{d.metrics}/healthz", timeout=10).status == 200
    finally:
        code = d.stop()
    assert code == 0
    names = [e.get("event") for e in d.events()]
    assert {"ready", "training_started", "model_serving", "stopping", "stopped"} <= set(names)


@pytest.mark.slow
def test_bad_input_is_acked_as_rejected_counted_and_quarantined(tmp_path, config):
    d = Daemon(tmp_path / "state", config)
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.ingest)
        header = {"v": 1, "sensor": "s", "seq": 1, "t0_ns": 1, "fs": 20800, "dtype": "int16", "shape": [1, 100]}
        bad = [
            [b"rec.s", b"{nope", b""],
            [b"rec.s", json.dumps({**header, "v": 9}).encode(), b"\0" * 200],
            [b"rec.s", json.dumps(header).encode(), b"\0" * 3],
            [b"rec.s", json.dumps(header).encode(), np.zeros(100, "<i2").tobytes()],  # constant: no spectrum
        ]
        for frames in bad:
            sock.send_multipart(frames)
        acks = []
        while len(acks) < len(bad) and sock.poll(10_000):
            acks.append(decode_ack(sock.recv_multipart()))
        assert sorted(a["reason"] for a in acks) == ["featurise", "json", "length", "version"]
        assert all(a["status"] == "rejected" for a in acks)
        st = wait_for(lambda: (s := d.status())["quarantine"] and s, timeout=10)
        assert st["quarantine"] == {"featurise": 1, "json": 1, "length": 1, "version": 1} and st["events"] == 0
        body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert 'wingbeat_events_rejected_total{reason="json"} 1.0' in body
        sock.close()
        # SIGHUP reloads and says what needs a restart
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: any(e.get("event") == "reloaded" for e in d.events()), timeout=10)
    finally:
        assert d.stop() == 0


@pytest.mark.slow
def test_starts_from_a_model_trained_offline_and_refuses_a_bad_one(tmp_path, sim, config):
    model = tmp_path / "m"
    r = cli("train", str(sim), "--out", str(model), "--epochs", "30", timeout=300)
    assert r.returncode == 0, r.stderr
    rec = read_recordings(sim)
    published = {}
    for threads in ("2", "0"):  # featurising in threads or on the loop's own: the same outputs
        conf = tmp_path / f"threads-{threads}.toml"
        conf.write_text(CONFIG.replace("[ingest]\n", f"[ingest]\nfeaturise_threads = {threads}\n"))
        d = Daemon(tmp_path / f"state-{threads}", conf, "--model", str(model))
        try:
            sub = Subscriber(d.publish)
            time.sleep(0.3)
            res = replay(events_of(rec, "a", 0, False), d.ingest, window=64, ack_timeout_s=10, give_up_s=60)
            assert res.acked == 320
            got = sub.drain(320, timeout=60)  # a model from the start: outputs right away
            assert len(got) == 320
            assert [o["seq"] for o in got] == list(range(320))  # in arrival order
            published[threads] = got
        finally:
            assert d.stop() == 0
    for a, b in zip(published["2"], published["0"], strict=True):
        assert (a["cluster"], a["model_version"]) == (b["cluster"], b["model_version"])
        # features made in threads round differently in the last places (float32 sums over other batch sizes),
        # and the encoder carries that on: up to 8e-6 apart on one CPU
        np.testing.assert_allclose(a["latent"], b["latent"], rtol=1e-4, atol=1e-5)
    (model / "weights.safetensors").write_bytes(b"garbage")
    r = cli("run", "--state", str(tmp_path / "s2"), "--model", str(model), "--metrics", "", timeout=60)
    assert r.returncode == 2 and "does not match the checksum" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_drift_starts_a_retrain(tmp_path, sim):
    model = tmp_path / "m"
    assert cli("train", str(sim), "--out", str(model), "--epochs", "60").returncode == 0  # 3 species
    other = tmp_path / "other.npz"
    assert cli("simulate", "--out", str(other), "--events", "300", "--species", "12", "--seed", "7").returncode == 0
    conf = tmp_path / "drift.toml"
    conf.write_text(CONFIG + "drift_window = 100\ndrift_novelty = 0.2\n")
    d = Daemon(tmp_path / "state", conf, "--model", str(model))
    try:
        res = replay(events_of(read_recordings(other), "field", 0, False), d.ingest, window=32, give_up_s=60)
        assert res.acked == 300
        drift = wait_for(lambda: [e for e in d.events() if e.get("event") == "drift"], timeout=60)
        assert drift[0]["novel_fraction"] > 0.2 or drift[0]["rec_error"] > 2 * drift[0]["training_rec_error"]
        started = wait_for(lambda: [e for e in d.events() if e.get("event") == "training_started"], timeout=30)
        assert started[0]["kind"] == "full" and started[0]["parent"] == 1
        # the trainer killed mid-training: logged, counted, retried later; serving goes on
        os.kill(started[0]["pid"], signal.SIGKILL)
        failed = wait_for(lambda: [e for e in d.events() if e.get("event") == "training_failed"], timeout=30)
        assert "signal 9" in failed[0]["error"] and failed[0]["retry_in_s"] > 0
        more = replay(events_of(read_recordings(other), "field", 300, False), d.ingest, window=32, give_up_s=60)
        assert more.acked == 300
        body = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
        assert 'wingbeat_training_runs_total{kind="full",outcome="failed"} 1.0' in body
        assert d.status()["serving"] == 1
    finally:
        assert d.stop() == 0


@pytest.mark.gpu
@pytest.mark.slow
def test_the_trainer_trains_on_cuda_when_told_to(tmp_path, sim):
    """A real daemon with ``training.device = "cuda"``: its first version is trained on the GPU and serves."""
    cfg = tmp_path / "wingbeat.toml"
    cfg.write_text(CONFIG + 'device = "cuda"\n')  # CONFIG ends in the [training] table
    d = Daemon(tmp_path / "state", cfg)
    try:
        res = replay(events_of(read_recordings(sim), "gpu", 0, False), d.ingest, window=64, give_up_s=60)
        assert (res.acked, res.unacked, res.rejected) == (320, 0, {})
        wait_for(lambda: d.status()["serving"] == 1, timeout=240, every=1)
        manifest = json.loads((d.state / "models" / "v1" / "manifest.json").read_text())
        assert manifest["gate_metrics"]["device"].startswith("cuda"), manifest["gate_metrics"]
        wait_for(lambda: d.status()["outputs"] == 320, timeout=60)
    finally:
        assert d.stop() == 0


def test_replay_says_what_was_not_acked(tmp_path, sim):
    # nothing listens there: every event stays unacked, exit status 1
    r = cli("replay", str(sim), "--connect", "tcp://127.0.0.1:9", "--give-up", "1", "--ack-timeout", "0.5")
    assert r.returncode == 1 and "acked 0" in r.stdout and "unacked" in r.stdout


os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def test_gate_known_answers():
    from daemon.train.supervisor import gate

    ok = {"val_rec": 10.9, "parent_val_rec": 10.0, "ari": 0.60, "parent_ari": 0.62}
    assert gate(ok, 0.10, 0.05) == ""  # 9 % worse, 0.02 ARI lower: within both tolerances
    assert "worse than the serving model's 10" in gate({**ok, "val_rec": 11.2}, 0.10, 0.05)
    assert gate({**ok, "val_rec": 11.2}, 0.15, 0.05) == ""
    assert "ARI on labelled events 0.500 is below the serving model's 0.620" in gate({**ok, "ari": 0.5}, 0.10, 0.05)
    assert "not finite" in gate({**ok, "val_rec": float("nan")}, 0.10, 0.05)
    assert gate({"val_rec": 5.0}, 0.0, 0.0) == ""  # a first model: nothing to compare with
