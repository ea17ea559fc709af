"""Serving with the version's own features, a SIGHUP that reaches every stage, and what the plain (PULL) endpoint
loses when a commit fails: the real daemon (or the real Service in process), real sockets, a real SQLite file."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from harness import CONFIG, Daemon, Subscriber, cli, simulate, wait_for

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.ops.config import RELOADABLE, Config, flatten, load
from daemon.protocol import encode_ingest
from daemon.serve.service import Service
from daemon.store.db import DB_NAME, Store
from daemon.store.versions import read_version, write_version
from model.build import build
from model.checkpoint import pack
from model.cluster import ClusterConfig
from model.spectra import FeatureConfig, featurise_events
from model.train import TrainConfig
from model.vae import VAEConfig


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 200, 3, 7)


def metric(d: Daemon, name: str) -> float:
    text = urllib.request.urlopen(f"http://{d.metrics}/metrics", timeout=10).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def model_with_features(sim: Path, out: Path, features: FeatureConfig) -> Path:
    """A version trained offline on features made with ``features`` (not the default grid)."""
    rec = read_recordings(sim)
    fb = featurise_events([rec.event(i) for i in range(len(rec))], rec.fs.tolist(), features)
    x = fb.features[fb.ok].reshape(int(fb.ok.sum()), -1)
    b = build(
        x,
        np.full(len(x), ""),
        VAEConfig(n_in=x.shape[1]),
        TrainConfig(epochs=10, seed=0),
        ClusterConfig(seed=0),
        torch.device("cpu"),
    )
    return write_version(out, pack(b.model, b.clusterer, features, "recordings", b.manifest))


@pytest.mark.slow
def test_serving_featurises_as_the_version_does_and_refuses_one_that_differs_from_the_store(tmp_path, sim, config):
    narrow = FeatureConfig(f_max=1000.0)  # half the default grid
    model = model_with_features(sim, tmp_path / "narrow", narrow)
    assert read_version(model).model.cfg.n_in == narrow.n_bins * 2  # two wavelengths
    d = Daemon(tmp_path / "state", config, "--model", str(model))
    try:
        sub = Subscriber(d.publish)
        time.sleep(0.5)
        rec = read_recordings(sim)
        res = replay(events_of(rec, "s", 0, False), d.ingest, window=64, give_up_s=60)
        assert res.acked == 200
        got = sub.drain(200, timeout=60)
        assert len(got) == 200 and all(len(g["latent"]) == 4 for g in got)  # every event through the model
        assert sum(g["cluster"] >= 0 for g in got) > 150
    finally:
        d.stop()
    st = Store(tmp_path / "state", readonly=True)
    assert FeatureConfig(**st.feature_config()) == narrow
    st.close()

    # a version made on the default grid cannot serve this store: said in one line, nothing changes
    default = tmp_path / "default"
    assert cli("train", str(sim), "--out", str(default), "--epochs", "3").returncode == 0
    r = cli("run", "--config", str(config), "--state", str(tmp_path / "state"), "--model", str(default))
    assert r.returncode == 2 and "differ from the stored events'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "wingbeat.toml"
    p.write_text(CONFIG)
    return p


def test_sighup_reaches_every_stage(tmp_path):
    """Every reloadable key is changed in the file; after the reload each stage runs with the new value, and the
    keys that need a restart keep theirs."""
    loopback = "tcp://127.0.0.1:0"
    path = tmp_path / "c.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[ingest]\nendpoint = "{loopback}"\n[publish]\nendpoint = '
        f'"{loopback}"\n[metrics]\nlisten = ""\n'
    )
    svc = Service(load(path), path)
    svc.bind()
    try:
        old = flatten(svc.cfg.to_dict())
        changed = {}
        for key, value in old.items():
            if not key.startswith(RELOADABLE) or isinstance(value, str | bool):
                continue
            changed[key] = value + 1 if isinstance(value, int) else value * 1.5
        changed["training.drift_novelty"] = 0.5  # (0, 1]
        changed["ingest.batch_wait_ms"] = 7.0
        text = path.read_text().replace("[ingest]\n", "[ingest]\nmax_channels = 4\n")  # needs a restart
        tables: dict[str, list[str]] = {}
        for key, value in changed.items():
            table, leaf = key.split(".")
            tables.setdefault(table, []).append(f"{leaf} = {value!r}")
        for table, lines in tables.items():
            if f"[{table}]" in text:
                text = text.replace(f"[{table}]\n", f"[{table}]\n" + "\n".join(lines) + "\n")
            else:
                text += f"[{table}]\n" + "\n".join(lines) + "\n"
        path.write_text(text)
        svc.apply_reload()
        new = flatten(svc.cfg.to_dict())
        assert {k: new[k] for k in changed} == changed
        assert svc.cfg.ingest.max_channels == 8  # kept: needs a restart
        # each stage holds what it uses
        assert svc.ingest.cfg.batch_max == changed["ingest.batch_max"]
        assert svc.ingest.cfg.batch_wait_ms == 7.0
        assert svc.schedule.cfg == svc.cfg.training == svc.supervisor.cfg.training
        assert svc.schedule.novel.maxlen == svc.schedule.rec.maxlen == changed["training.drift_window"]
        svc.housekeep()  # retention and the disk floor read the config each round
        assert svc.metrics.raw_limit._value.get() == changed["store.raw_max_bytes"]
        assert svc.metrics.min_free._value.get() == changed["store.min_free_bytes"]
    finally:
        svc.store.close()
        svc.ingest.close()
        svc.publisher.close()
        svc.ctx.term()


@pytest.mark.slow
def test_plain_endpoint_loss_on_a_failed_commit_is_measured_and_counted(tmp_path, sim):
    """The PULL endpoint has no acks: what a failed commit held is gone. The store is locked past SQLite's busy
    timeout while a fire-and-forget sender sends; every event is either stored or counted as dropped."""
    conf = tmp_path / "c.toml"
    ingest = '[ingest]\nendpoint = "tcp://127.0.0.1:0"\n'
    conf.write_text(CONFIG.replace(ingest, ingest + 'plain_endpoint = "tcp://127.0.0.1:0"\n'))
    d = Daemon(tmp_path / "state", conf)
    lock = sqlite3.connect(d.state / DB_NAME, isolation_level=None, timeout=5)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(d.ingest_plain)
    try:
        events = list(events_of(read_recordings(sim), "p", 0, False))[:60]
        lock.execute("BEGIN EXCLUSIVE")
        for e in events[:40]:
            push.send_multipart(encode_ingest(e))
        # the first failed commit stops keeping raw samples and tries again; the second gives the batch up
        wait_for(lambda: [e for e in d.events() if e.get("event") == "store_failed"], timeout=120, every=1)
        lock.execute("ROLLBACK")
        for e in events[40:]:
            push.send_multipart(encode_ingest(e))
        wait_for(lambda: metric(d, 'wingbeat_events_received_total{endpoint="plain"}') == 60, timeout=30)
        wait_for(lambda: metric(d, "wingbeat_plain_dropped_total") + d.status()["events"] == 60, timeout=60)
        dropped = metric(d, "wingbeat_plain_dropped_total")
        stored = d.status()["events"]
        assert dropped > 0 and stored >= 20  # the batches of the failed commits are lost, and counted
        failed = [e for e in d.events() if e.get("event") == "store_failed"]
        assert sum(e["plain_dropped"] for e in failed) == dropped
        print(f"PULL under a failed commit: sent 60, stored {stored}, dropped and counted {dropped:.0f}")
    finally:
        if lock.in_transaction:
            lock.execute("ROLLBACK")
        lock.close()
        push.close()
        d.stop()


def subset(src: Path, out: Path, lo: int, hi: int) -> Path:
    """Recordings lo…hi−1 of a recordings file, as a recordings file (DESIGN §8)."""
    with np.load(src, allow_pickle=False) as d:
        offsets = d["offsets"]
        arrays = {
            "samples": d["samples"][offsets[lo] : offsets[hi]],
            "offsets": offsets[lo : hi + 1] - offsets[lo],
            **{k: d[k][lo:hi] for k in ("channels", "fs", "label", "sensor", "t0_ns") if k in d},
        }
    np.savez(out, allow_pickle=False, **arrays)
    return out


@pytest.mark.slow
def test_published_clusters_score_what_evaluate_scores_on_unseen_recordings(tmp_path_factory, tmp_path):
    """No loss between offline and serving: a model trained on one half of a simulated set serves the other half
    through the daemon; the published clusters are the ones ``wingbeat evaluate`` computes for the same events."""
    from daemon.store.versions import read_version
    from model.evaluate import scores
    from model.predict import predict

    both = simulate(tmp_path_factory, 1000, 4, 3)
    train, unseen = subset(both, tmp_path / "train.npz", 0, 600), subset(both, tmp_path / "unseen.npz", 600, 1000)
    model = tmp_path / "m"
    assert cli("train", str(train), "--out", str(model), "--epochs", "150", timeout=600).returncode == 0
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG)
    d = Daemon(tmp_path / "state", conf, "--model", str(model))
    try:
        sub = Subscriber(d.publish)
        time.sleep(0.5)
        rec = read_recordings(unseen)
        assert replay(events_of(rec, "u", 0, False), d.ingest, window=64, give_up_s=60).acked == 400
        got = {g["seq"]: g for g in sub.drain(400, timeout=60)}
    finally:
        d.stop()
    assert sorted(got) == list(range(400)) and {g["model_version"] for g in got.values()} == {1}
    served = np.array([got[i]["cluster"] for i in range(400)])
    r = cli("evaluate", str(model), str(unseen), "--json")
    assert r.returncode == 0, r.stderr
    offline = json.loads(r.stdout.splitlines()[-1])
    published = scores(rec.label, served)
    print(f"unseen recordings: published ARI {published['ari']:.3f}, wingbeat evaluate ARI {offline['ari']:.3f}")
    assert len(set(served.tolist()) - {-1}) >= 2 and offline["ari"] > 0.15  # a model that tells species apart
    assert published["ari"] == pytest.approx(offline["ari"], abs=0.01)
    assert published["ami"] == pytest.approx(offline["ami"], abs=0.01)
    # event by event: the daemon featurises in batches, evaluate all at once; float32 rounding may move an event
    # that sits on a boundary, nothing more
    from daemon.data.datasets import load_dataset

    version = read_version(model)
    same = served == predict(version, load_dataset(unseen, version.features).features).cluster
    assert same.mean() >= 0.99


def test_config_is_the_same_object_tree_after_a_round_trip():
    cfg = Config()
    from daemon.ops.config import from_dict

    assert from_dict(cfg.to_dict()) == cfg
