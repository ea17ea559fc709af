"""The serving loop's stages on their own, with plain arrays: decoding a batch, the pipeline (featurise, split,
predict, settle), the training schedule, and a config reload. No daemon process; sockets only where a stage owns
one (acks, the publisher's cluster labels)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import zmq

from daemon.ops.config import Config, Training, reload
from daemon.ops.metrics import Metrics
from daemon.protocol import Event, Limits, Received, encode_ingest
from daemon.serve.ingest import Ingest, decode_batch
from daemon.serve.pipeline import Featuriser, outputs_for, process, settle
from daemon.serve.publish import Publisher
from daemon.train.supervisor import TrainingSchedule
from model.checkpoint import ModelVersion, pack, unpack
from model.cluster import NOVEL, ClusterConfig, fit_clusterer
from model.spectra import FeatureConfig
from model.train import encode_mu
from model.vae import VAE, VAEConfig

FS = 20_800.0


def event(seq: int, sensor: str = "s1", fs: float = FS, n: int = 4000, channels: int = 1) -> Event:
    t = np.arange(n) / fs
    x = 1000 * np.sin(2 * np.pi * (100 + 10 * seq) * t) + np.random.default_rng(seq).normal(0, 50, n)
    return Event(sensor, seq, 1_000 + seq, fs, "int16", channels, np.tile(x, (channels, 1)).astype(np.int16))


def received(e: Event, endpoint: str = "ack") -> Received:
    return Received(encode_ingest(e), b"peer" if endpoint == "ack" else None, 0.0, endpoint)


@pytest.fixture(scope="module")
def version() -> ModelVersion:
    """An untrained model over one channel's features and a mixture fitted to what it makes of random inputs."""
    torch.manual_seed(0)
    n_in = FeatureConfig().n_bins
    vae = VAE(VAEConfig(n_in=n_in))
    mu, err = encode_mu(vae, torch.rand(200, n_in))
    clus = fit_clusterer(mu.double().numpy(), err.double().numpy(), ClusterConfig(seed=0))
    return unpack(pack(vae, clus, FeatureConfig(), "recordings", {}))


def test_decode_batch_names_rejects_and_keeps_the_first_copy():
    a, b = event(0), event(1)
    bad = Received([b"rec.s1", b"{not json", b""], b"peer", 0.0, "ack")
    d = decode_batch([received(a), received(b), received(a), bad], Limits())
    assert [e.seq for _, e in d.events] == [0, 1]
    assert [e.seq for _, e in d.duplicates] == [0]
    assert [j.reason for _, j in d.rejects] == ["json"]


def test_process_quarantines_what_cannot_be_featurised_with_its_reason_and_detail(version):
    good, low = event(0), event(1, fs=1000.0)  # 1 kHz cannot resolve the 2 kHz grid
    d = decode_batch([received(good), received(low, "plain"), received(good)], Limits())
    job = Featuriser(0).start(d, FeatureConfig(), busy=False)
    p = process(job.decoded, job.featurised(), None, 0, caught_up=True, frame_cap=100)
    assert [e.seq for _, e in p.events] == [0] and p.features[0].shape == (1, FeatureConfig().n_bins)
    (q,) = p.quarantine
    assert (q.reason, q.sensor, q.seq, q.endpoint) == ("featurise", "s1", 1, "plain")
    assert q.detail == "sample rate 1000 Hz cannot resolve the 2000 Hz grid"  # a detail, not "event 1: …"
    assert len(q.frames) == 100  # capped
    assert sorted((a.seq, a.status, a.reason) for a in p.acks) == [(0, "duplicate", ""), (1, "rejected", "featurise")]
    assert p.outputs is None  # no model serves


def test_featurise_threads_give_the_same_features_as_the_serving_thread():
    d = decode_batch([received(event(i)) for i in range(40)], Limits())
    one = Featuriser(0).start(d, FeatureConfig(), busy=False).featurised()
    pool = Featuriser(2)
    job = pool.start(d, FeatureConfig(), busy=True)
    assert len(job.parts) == 3  # 40 events ≥ SPLIT_FROM: one part per thread, and one more for the serving thread
    got = job.featurised()
    small = decode_batch([received(event(i)) for i in range(5)], Limits())
    assert len(pool.start(small, FeatureConfig(), busy=True).parts) == 1
    idle = pool.start(small, FeatureConfig(), busy=False)  # nothing else in flight: made at once, no hand-off
    assert idle.parts[0].done() and sorted(idle.featurised().features) == list(range(5))
    pool.close()
    assert sorted(got.features) == sorted(one.features) == list(range(40))
    for i in range(40):
        # float32 sums over batches of another size round differently in the last places (2.7e-5 relative seen on
        # one CPU, in one value of 193)
        np.testing.assert_allclose(got.features[i], one.features[i], rtol=1e-4, atol=1e-6)


def test_the_serving_thread_makes_the_parts_no_thread_has_started():
    # the one featurise thread is held by other work: the batch's parts stay queued, and the serving thread makes
    # them all itself instead of waiting (it would wait for ever, here, without)
    d = decode_batch([received(event(i)) for i in range(40)], Limits())
    pool = Featuriser(1)
    hold, held = threading.Event(), threading.Event()
    assert pool.pool is not None
    blocker = pool.pool.submit(lambda: (held.set(), hold.wait(30)))
    assert held.wait(10)
    job = pool.start(d, FeatureConfig(), busy=True)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(job.featurised()), daemon=True)
    t.start()
    t.join(30)
    try:
        assert result, "the serving thread waited for a busy featurise thread"
        assert not blocker.done() and all(f.cancelled() for f in job.parts)
        assert sorted(result[0].features) == list(range(40))  # type: ignore[attr-defined]
    finally:
        hold.set()
        pool.close()
    # a part a thread has started is waited for, not made twice: with a free thread, nothing is cancelled
    free = Featuriser(1)
    job = free.start(d, FeatureConfig(), busy=True)
    assert free.pool is not None
    free.pool.submit(lambda: None).result(10)  # the thread has taken every part queued before this
    assert sorted(job.featurised().features) == list(range(40))
    assert not any(f.cancelled() for f in job.parts)
    free.close()


def test_outputs_are_predicted_with_the_batch_only_when_caught_up_and_settled_with_their_ids(version):
    d = decode_batch([received(event(i)) for i in range(5)], Limits())
    feats = Featuriser(0).start(d, FeatureConfig(), busy=False).featurised()
    behind = process(d, feats, version, 7, caught_up=False, frame_cap=100)
    assert behind.outputs is None  # older events wait for outputs: the backlog path serves these in order
    p = process(d, feats, version, 7, caught_up=True, frame_cap=100)
    assert p.outputs is not None and len(p.outputs) == 5 and all(o.event_id == 0 for o in p.outputs)
    s = settle(p, [11, -1, 12, 13, 14])  # the second was stored before (a resend)
    assert [eid for _, _, eid in s.stored] == [11, 12, 13, 14]
    assert [(a.seq, a.status) for a in s.acks] == [
        (0, "stored"),
        (1, "duplicate"),
        (2, "stored"),
        (3, "stored"),
        (4, "stored"),
    ]
    assert [(o.event_id, o.seq, o.model_version) for o in s.outputs] == [(11, 0, 7), (12, 2, 7), (13, 3, 7), (14, 4, 7)]
    # the same outputs as the backlog path builds from stored features: one builder for both
    x = np.stack([feats.features[i].reshape(-1) for i in (0, 2, 3, 4)])
    again = outputs_for(version, 7, [(o.event_id, o.sensor, o.seq, o.t0_ns) for o in s.outputs], x, np.ones(4, bool))
    assert again == s.outputs


def test_outputs_for_features_the_model_cannot_take_are_novel_without_a_latent(version):
    n_in = version.model.cfg.n_in
    x = np.random.default_rng(0).random((3, n_in)).astype(np.float32)
    out = outputs_for(version, 2, [(1, "a", 0, 5), (2, "a", 1, 6), (3, "a", 2, 7)], x, np.array([True, False, True]))
    assert out[1].cluster == NOVEL and out[1].latent == () and out[1].probability == 0.0
    assert len(out[0].latent) == version.model.cfg.latent_dim and out[2].event_id == 3


# ---- the training schedule: a hand-made table -------------------------------------------------------------------
CFG = Training(first_after=100, finetune_every_events=50, finetune_every_s=600.0, full_every_events=200)


@pytest.mark.parametrize(
    ("has_model", "events", "last_events", "now", "last_time", "not_before", "want"),
    [
        (False, 99, 0, 0.0, 0.0, 0.0, ""),  # not enough for a first training
        (False, 100, 0, 0.0, 0.0, 0.0, "first"),
        (False, 100, 0, 5.0, 0.0, 10.0, ""),  # backing off after a failure
        (True, 149, 100, 1.0, 0.0, 0.0, ""),  # 49 new events, 1 s: nothing yet
        (True, 150, 100, 1.0, 0.0, 0.0, "finetune"),  # 50 new events
        (True, 300, 100, 1.0, 0.0, 0.0, "full"),  # 200 new events
        (True, 101, 100, 600.0, 0.0, 0.0, "finetune"),  # an hour… of the config's 600 s, with a new event
        (True, 100, 100, 600.0, 0.0, 0.0, ""),  # …but never without new events
    ],
)
def test_schedule_table(has_model, events, last_events, now, last_time, not_before, want):
    s = TrainingSchedule(CFG, events=events, has_model=has_model, last_events=last_events, last_time=last_time)
    s.not_before = not_before
    assert s.due(now) == want
    assert s.explain(now)  # always says something


def test_schedule_drift_backoff_and_request():
    s = TrainingSchedule(Training(drift_window=10, drift_novelty=0.2, drift_rec_ratio=2.0, backoff_s=30.0))
    s.serving(train_rec=1.0)
    s.observe(10, [False] * 10, [1.5] * 10)
    assert s.due(0.0) == ""  # 0 % novel, 1.5 × the training error
    s.observe(10, [True] * 3, [1.0] * 3)  # the window slides: 3 of 10 novel
    assert s.due(0.0) == "full" and s.reason == "drift" and s.detail["novel_fraction"] == pytest.approx(0.3)
    assert len(s.novel) == 0  # measured afresh
    s.observe(10, [False] * 10, [2.5] * 10)
    assert s.due(0.0) == "full" and s.detail["rec_error"] == pytest.approx(2.5)
    s.started(0.0)
    assert s.due(1.0) == "" and s.explain(1.0) == "running now"
    assert s.finished(False, 1.0) == 30.0 and s.finished(False, 1.0) == 60.0  # doubling
    s.requested = True
    assert s.due(1.0 + 59) == ""  # still backing off
    assert s.due(1.0 + 61) == "" and s.reason == "ignored"  # 10 events: too few to train on
    s.requested = True
    s.observe(20)
    assert s.due(1.0 + 61) == "full" and s.reason == "requested"
    assert s.finished(True, 70.0) == 0.0 and s.failures == 0


def test_schedule_drift_window_follows_the_config():
    s = TrainingSchedule(Training(drift_window=100))
    s.observe(0, [True] * 80, [1.0] * 80)
    s.cfg = Training(drift_window=20)
    s.resize()
    assert s.novel.maxlen == s.rec.maxlen == 20 and len(s.novel) == 20  # the newest kept


# ---- config reload: every reloadable key takes effect, the others wait for a restart ----------------------------
def test_reload_applies_reloadable_keys_and_keeps_the_rest(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\nbatch_max = 64\nendpoint = "tcp://127.0.0.1:7000"\n[training]\ndrift_window = 50\n')
    old = Config()
    new, applied, restart = reload(old, path, {"training.seed": 3})
    assert applied == ["ingest.batch_max", "training.drift_window", "training.seed"]
    assert restart == ["ingest.endpoint"]
    assert new.ingest.batch_max == 64 and new.training.drift_window == 50 and new.training.seed == 3
    assert new.ingest.endpoint == old.ingest.endpoint  # needs a restart: the running value stays


# ---- sockets a stage owns ---------------------------------------------------------------------------------------
def test_an_ack_that_cannot_be_delivered_is_counted_not_dropped():
    ctx: zmq.Context = zmq.Context()
    m = Metrics()
    ingest = Ingest(ctx, Config().ingest.__class__(endpoint="tcp://127.0.0.1:0"), m, {})
    ingest.bind(lambda *_: None)
    try:
        ingest.ack(received(event(0)), "s1", 0, "stored")  # no peer called b"peer" is connected
        assert m.acks_undelivered.labels("peer_gone")._value.get() == 1
        assert m.acks.labels("stored")._value.get() == 0
    finally:
        ingest.close()
        ctx.term()


def test_cluster_labels_stay_bounded_across_versions():
    from prometheus_client import generate_latest

    ctx: zmq.Context = zmq.Context()
    m = Metrics()
    pub = Publisher(ctx, Config().publish, m)
    try:
        for ids in ([0, 1, 2], [0, 3], [4, 5]):
            pub.live_clusters(ids)
        text = generate_latest(m.registry).decode()
        labels = {
            line.split('cluster="')[1].split('"')[0] for line in text.splitlines() if "cluster_events_total{" in line
        }
        assert labels == {str(NOVEL), "4", "5"}
    finally:
        ctx.term()


def test_nan_drift_reference_never_triggers_on_reconstruction():
    s = TrainingSchedule(Training(drift_window=10, drift_novelty=0.5))
    s.serving(train_rec=math.nan)
    s.observe(10, [False] * 10, [1e9] * 10)
    assert s.due(0.0) == ""


@pytest.mark.parametrize(
    ("busy", "share", "rest"), [(0.2, 1.0, 0.0), (0.2, 0.5, 0.2), (0.3, 0.3, 0.7), (-1.0, 0.5, 0.0)]
)
def test_a_cpu_training_rests_to_its_share(busy, share, rest):
    from daemon.train.trainer import rest_after

    assert rest_after(busy, share) == pytest.approx(rest)


@pytest.mark.parametrize(
    ("kind", "parent_cluster", "expected"),
    [
        ("first", None, ("best", 3, "density", 0.65)),  # a new model: groups by density, the split, three
        ("full", {"method": "dp", "split_silhouette": 0.0}, ("best", 1, "density", 0.65)),  # … one training
        ("finetune", {"method": "density", "split_silhouette": 0.65}, ("best", 1, "density", 0.65)),  # as its parent
        ("finetune", {"method": "ward", "split_silhouette": 0.65}, ("best", 1, "ward", 0.65)),  # … an older one …
        ("finetune", {"method": "ward", "split_silhouette": 0.0}, ("best", 1, "ward", 0.0)),  # … `wingbeat train`
        ("finetune", {"method": "dp", "split_silhouette": 0.0}, ("best", 1, "dp", 0.0)),  # … --clusters dp
        ("finetune", {}, ("best", 1, "ward", 0.0)),  # a manifest from before the split
    ],
)
def test_each_kind_of_training_keeps_its_epoch_and_cuts_by_its_rule(kind, parent_cluster, expected):
    from daemon.train.trainer import recipe

    assert recipe(kind, 3, parent_cluster) == expected


def test_an_unknown_kind_of_training_is_refused():
    from daemon.train.trainer import recipe

    with pytest.raises(ValueError, match="kind must be one of"):
        recipe("partial", 3)
