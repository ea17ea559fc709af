import json

import numpy as np
import pytest

from daemon.protocol import (
    REASONS,
    Event,
    Limits,
    Output,
    Reject,
    decode_ack,
    decode_ingest,
    encode_ack,
    encode_ingest,
    encode_output,
)


def good(**header_changes: object) -> list[bytes]:
    x = (np.arange(2 * 200) % 50).astype("<i2").reshape(2, 200)
    frames = encode_ingest(Event("lidar-1", 7, 1_700_000_000_000_000_000, 20800.0, "int16", 2, x, "Aedes"))
    header = json.loads(frames[1])
    header.update(header_changes)
    header = {k: v for k, v in header.items() if v is not None}
    return [frames[0], json.dumps(header).encode(), frames[2]]


def test_round_trip():
    e = decode_ingest(good())
    assert isinstance(e, Event)
    assert (e.sensor, e.seq, e.fs, e.dtype, e.channels, e.label) == ("lidar-1", 7, 20800.0, "int16", 2, "Aedes")
    assert e.samples.shape == (2, 200) and e.samples[1, 3] == 3


@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "float32", "float64"])
def test_every_dtype_decodes(dtype):
    x = np.linspace(0, 100, 2 * 128).astype(np.dtype(dtype).newbyteorder("<")).reshape(2, 128)
    e = decode_ingest(encode_ingest(Event("s", 0, 1, 10000.0, dtype, 2, x)))
    assert isinstance(e, Event) and np.array_equal(e.samples, x)


def payload(frames: list[bytes], data: bytes) -> list[bytes]:
    return [frames[0], frames[1], data]


CASES = {
    "frames": lambda: good()[:2],
    "topic": lambda: [b"rec.other", *good()[1:]],
    "json": lambda: [good()[0], b"{not json", good()[2]],
    "version": lambda: good(v=2),
    "header": lambda: good(fs=-5),
    "dtype": lambda: good(dtype="complex64"),
    "length": lambda: payload(good(), good()[2][:-2]),
    "too_few_samples": lambda: good(shape=[2, 10]),
    "too_many_channels": lambda: good(shape=[9, 200]),
    "too_many_samples": lambda: good(shape=[1, 3_000_000]),
    "non_finite": lambda: (
        [*good(dtype="float32", shape=[1, 200])[:2], np.r_[np.zeros(199), np.nan].astype("<f4").tobytes()]
    ),
    "oversize": lambda: [*good()[:2], b"\x00" * (17 * 1024 * 1024)],
    "encoding": lambda: good(label="\ud800"),
    "nesting": lambda: good(meta={"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}),
}


@pytest.mark.parametrize("reason", sorted(CASES))
def test_each_violation_is_rejected_with_its_reason(reason):
    r = decode_ingest(CASES[reason]())
    assert isinstance(r, Reject), r
    assert r.reason == reason and r.detail


def test_every_reason_but_the_store_and_feature_ones_has_a_case():
    assert set(REASONS) - set(CASES) == {"duplicate", "featurise", "store"}


@pytest.mark.parametrize(
    "change",
    [
        {"sensor": "bad sensor!"},
        {"sensor": "x" * 65},
        {"seq": -1},
        {"seq": 1.5},
        {"seq": True},
        {"t0_ns": "now"},
        {"fs": True},
        {"fs": "20800"},
        {"shape": [2]},
        {"shape": [2, "200"]},
        {"label": 5},
        {"meta": [1, 2]},
        {"extra": 1},
    ],
)
def test_bad_header_fields_name_the_problem(change):
    r = decode_ingest(good(**change))
    assert isinstance(r, Reject) and r.reason in ("header", "topic")


def test_rejects_keep_who_sent_them_when_known():
    r = decode_ingest(good(dtype="bogus"))
    assert isinstance(r, Reject) and (r.sensor, r.seq) == ("lidar-1", 7)


def test_garbage_never_raises():
    rng = np.random.default_rng(0)
    for _ in range(500):
        frames = [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(0, 5)))]
        assert isinstance(decode_ingest(frames), Reject)
    assert isinstance(decode_ingest([b"rec.a", b"[]", b""]), Reject)
    assert isinstance(decode_ingest([b"rec.a", b'"x"', b""]), Reject)
    assert isinstance(decode_ingest([b"rec.a", b"\xff\xfe", b""]), Reject)
    assert isinstance(decode_ingest([b"rec.a", b"[" * 100_000, b""]), Reject)


def test_limits_are_configurable():
    assert isinstance(decode_ingest(good(), Limits(max_channels=1)), Reject)
    assert isinstance(decode_ingest(good(), Limits(min_samples=500)), Reject)


def test_ack_and_output_codecs():
    assert decode_ack(encode_ack("s", 3, "stored")) == {"sensor": "s", "seq": 3, "status": "stored"}
    assert decode_ack(encode_ack("s", 3, "rejected", "json"))["reason"] == "json"
    assert decode_ack([b"ack", b"{}"]) is None and decode_ack([b"nope"]) is None
    topic, body = encode_output(Output(1, "s", 7, 99, 3, 2, 0.5, 0.25, 0.125, (1.0, -1.0)))
    assert topic == b"cluster.s"
    assert json.loads(body) == {  # DESIGN §2: the reconstruction error stays in the store
        "v": 1,
        "event_id": 1,
        "sensor": "s",
        "seq": 7,
        "t0_ns": 99,
        "latent": [1.0, -1.0],
        "cluster": 2,
        "probability": 0.5,
        "novelty": 0.25,
        "model_version": 3,
    }
