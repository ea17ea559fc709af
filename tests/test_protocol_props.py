"""Property-based tests of every codec: arbitrary frames, headers and payloads never raise out of a decoder; each
input is accepted or rejected with a named reason; what is accepted round-trips."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.ops.config import Config, ConfigError, load
from daemon.protocol import (
    DTYPES,
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
    json_problem,
    plainly_bounded,
)

pytestmark = pytest.mark.faults  # hostile input: part of `make faults`
LIMITS = Limits(max_channels=4, min_samples=8, max_samples=4096, max_message_bytes=1 << 16)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
header_values = {
    "v": st.sampled_from([1, 1, 1, 0, 2, "1", True, None, 1.0]),
    "sensor": st.sampled_from(["s1", "trap-07", "", "a" * 65, "bad/name", 7, None]) | st.text(max_size=70),
    "seq": st.integers(min_value=-5, max_value=2**64) | st.sampled_from([1.5, "3", True, None]),
    "t0_ns": st.integers(min_value=-5, max_value=2**64) | st.sampled_from([0.5, "x", None]),
    "fs": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10**8) | st.sampled_from(["20k", None]),
    "dtype": st.sampled_from([*DTYPES, "int8", "complex64", ">i2", 3, None]),
    "shape": st.lists(st.integers(-3, 5000) | st.sampled_from([1.0, "2", None]), max_size=3),
    "label": st.text(max_size=140) | st.integers(),
    "meta": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
    "extra": json_values,
}


@st.composite
def headers(draw: st.DrawFn) -> dict:
    keys = draw(st.sets(st.sampled_from(sorted(header_values)), min_size=0, max_size=len(header_values)))
    return {k: draw(header_values[k]) for k in keys}


def check(out: Event | Reject) -> None:
    assert isinstance(out, Event | Reject)
    if isinstance(out, Reject):
        assert out.reason in REASONS and out.detail
        assert out.sensor is None or isinstance(out.sensor, str)
        assert out.seq is None or isinstance(out.seq, int)


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_frames_never_raise(frames):
    check(decode_ingest(frames, LIMITS))


@SETTINGS
@given(
    headers(),
    st.binary(max_size=2048),
    st.sampled_from(["rec.s1", "rec.trap-07", "rec.", "cluster.s1", "", "rec.\xff"]),
)
def test_arbitrary_headers_and_payloads_never_raise(header, payload, topic):
    out = decode_ingest([topic.encode("utf-8", "surrogateescape"), json.dumps(header).encode(), payload], LIMITS)
    check(out)
    if isinstance(out, Event):  # accepted only when everything holds
        assert topic == f"rec.{header['sensor']}" and header["v"] == 1 and out.samples.size * 0 == 0


@SETTINGS
@given(st.binary(max_size=400), st.binary(max_size=400))
def test_garbage_headers_are_rejected_as_json_or_header(raw, payload):
    out = decode_ingest([b"rec.s1", raw, payload], LIMITS)
    check(out)
    assert isinstance(out, Reject)


@SETTINGS
@given(
    st.sampled_from(sorted(DTYPES)),
    st.integers(1, 4),
    st.integers(8, 300),
    st.integers(0, 2**63 - 1),
    st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64),
    st.data(),
)
def test_valid_events_round_trip(dtype, channels, n, seq, sensor, data):
    dt = DTYPES[dtype]
    if dt.kind == "f":
        samples = data.draw(
            st.lists(st.floats(-1e6, 1e6, width=32), min_size=channels * n, max_size=channels * n).map(
                lambda v: np.array(v, dtype=dt).reshape(channels, n)
            )
        )
    else:
        info = np.iinfo(dt)
        seed = data.draw(st.integers(0, 2**32 - 1))
        samples = np.random.default_rng(seed).integers(info.min, info.max, (channels, n), endpoint=True).astype(dt)
    ev = Event(sensor, seq, 12345, 20_800.0, dtype, channels, samples, label="Aedes", meta={"k": [1, 2]})
    out = decode_ingest(encode_ingest(ev), LIMITS)
    assert isinstance(out, Event), out
    assert (out.sensor, out.seq, out.t0_ns, out.fs, out.dtype, out.channels, out.label, out.meta) == (
        sensor,
        seq,
        12345,
        20_800.0,
        dtype,
        channels,
        "Aedes",
        {"k": [1, 2]},
    )
    np.testing.assert_array_equal(out.samples, samples)


@SETTINGS
@given(st.sampled_from(sorted(DTYPES)), st.integers(8, 64), st.integers(0, 7))
def test_a_truncated_or_padded_payload_is_a_length_reject(dtype, n, cut):
    ev = Event("s1", 1, 1, 10_000.0, dtype, 1, np.ones((1, n), dtype=DTYPES[dtype]))
    topic, header, payload = encode_ingest(ev)
    for bad in (payload[: len(payload) - cut - 1], payload + b"\0" * (cut + 1)):
        out = decode_ingest([topic, header, bad], LIMITS)
        assert isinstance(out, Reject) and out.reason == "length"


@SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_decode_ack_never_raises(frames):
    assert decode_ack(frames) is None or isinstance(decode_ack(frames), dict)


@SETTINGS
@given(
    st.text(max_size=64) | st.none(),
    st.integers() | st.none(),
    st.sampled_from(["stored", "duplicate", "rejected"]),
    st.sampled_from(REASONS),
)
def test_acks_round_trip(sensor, seq, status, reason):
    body = decode_ack(encode_ack(sensor, seq, status, reason if status == "rejected" else ""))
    assert body is not None and (body["sensor"], body["seq"], body["status"]) == (sensor, seq, status)


@SETTINGS
@given(
    st.text(alphabet="abc019_.-", min_size=1, max_size=64),
    st.integers(0, 2**62),
    st.integers(-1, 30),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=8),
)
def test_outputs_are_json_on_the_sensor_topic(sensor, event_id, cluster, latent):
    topic, body = encode_output(Output(event_id, sensor, 0, 0, 1, cluster, 1.0, 0.0, 0.0, tuple(latent)))
    assert topic == f"cluster.{sensor}".encode()
    out = json.loads(body)
    assert out["v"] == 1 and out["event_id"] == event_id and out["cluster"] == cluster and out["latent"] == latent


KNOWN = {
    f"{table}.{key}" if isinstance(sub, dict) else table
    for table, sub in Config().to_dict().items()
    for key in (sub if isinstance(sub, dict) else [table])
}
printable = st.characters(blacklist_categories=("Cs", "Cc"))
toml_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(printable, max_size=12)
config_keys = st.sampled_from(
    [
        "ingest.endpoint",
        "ingest.batch_max",
        "ingest.max_message_bytes",
        "publish.hwm",
        "metrics.listen",
        "store.raw_max_bytes",
        "training.first_after",
        "training.device",
        "training.drift_novelty",
        "training.nice",
        "security.curve",
        "nonsense.key",
        "training.nonsense",
        "state_dir",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(config_keys, toml_scalars, max_size=4))
def test_any_config_is_accepted_or_refused_in_one_line_naming_a_key(tmp_path_factory, values):
    lines: dict[str, list[str]] = {}
    for dotted, v in values.items():
        if v is None:
            continue
        table, _, key = dotted.rpartition(".")
        if isinstance(v, str):
            text = json.dumps(v, ensure_ascii=False)
        elif isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, float):
            text = "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
        else:
            text = str(v)
        lines.setdefault(table, []).append(f"{key} = {text}")
    doc = "\n".join(lines.pop("", [])) + "".join(f"\n[{t}]\n" + "\n".join(kv) for t, kv in lines.items()) + "\n"
    tomllib.loads(doc)  # the test writes valid TOML; the config decides the rest
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(doc)
    try:
        load(path)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and ":" in msg
        named = msg.split(":")[0]  # the key at fault: one that was set, or (cross-key rules) one that must be
        tables = {k.rpartition(".")[0] for k in values}
        assert named in values or named in tables or named in KNOWN or named.endswith("c.toml"), msg


# ---- hostile classes: lone surrogates, 2^64, 400-digit numbers, deep nesting ------------------------------------
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
huge_ints = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**399, -(10**399)]) | st.integers(min_value=2**63)


def base_header() -> dict:
    x = np.zeros((1, 64), "<i2")
    return json.loads(encode_ingest(Event("s1", 3, 5, 20_800.0, "int16", 1, x, "Aedes", {"k": 1}))[1])


def frames_of(header: dict | bytes) -> list[bytes]:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return [b"rec.s1", raw, np.zeros((1, 64), "<i2").tobytes()]


def deep(depth: int, leaf: object = 1) -> object:
    """A value nested ``depth`` lists deep, built without recursion."""
    v = leaf
    for _ in range(depth):
        v = [v]
    return v


@SETTINGS
@given(st.text(max_size=10), surrogates, st.text(max_size=10), st.sampled_from(["label", "meta_key", "meta_value"]))
def test_a_lone_surrogate_anywhere_in_the_header_is_an_encoding_reject(before, s, after, where):
    text = before + s + after
    h = base_header()
    if where == "label":
        h["label"] = text
    elif where == "meta_key":
        h["meta"] = {text: 1}
    else:
        h["meta"] = {"note": [text]}
    out = decode_ingest(frames_of(h), LIMITS)
    assert isinstance(out, Reject) and out.reason == "encoding", out
    assert (out.sensor, out.seq) == ("s1", 3)  # still answerable: the ack names the event


@SETTINGS
@given(huge_ints, st.sampled_from(["seq", "t0_ns", "fs", "shape", "meta"]))
def test_integers_beyond_64_bits_are_header_rejects_never_exceptions(n, where):
    h = base_header()
    if where == "shape":
        h["shape"] = [1, n]
    elif where == "meta":
        h["meta"] = {"n": n}
    else:
        h[where] = n
    out = decode_ingest(frames_of(h), LIMITS)  # 10**399 as fs made math.isfinite raise OverflowError
    assert isinstance(out, Reject) and out.reason == "header", out


def test_a_400_digit_fs_written_as_json_text_is_a_reject():
    raw = json.dumps(base_header()).replace('"fs": 20800.0', '"fs": ' + "9" * 400).encode()
    assert b"9" * 400 in raw
    out = decode_ingest(frames_of(raw), LIMITS)
    assert isinstance(out, Reject) and out.reason == "header"


@pytest.mark.parametrize("depth", [16, 17, 100, 900, 5_000, 10_000])
def test_deep_nesting_is_refused_without_recursion_error(depth):
    h = base_header()
    h["meta"] = {"m": deep(depth - 2)}  # the header is depth 1, meta 2
    text = json.dumps({**h, "meta": {"m": 0}}).replace('"m": 0', '"m": ' + "[" * (depth - 2) + "0" + "]" * (depth - 2))
    out = decode_ingest(frames_of(text.encode()), LIMITS)
    if depth <= 16:
        assert isinstance(out, Event)
    else:  # past the bound: "nesting", or "json" where the parser stops first, or too big a header
        assert isinstance(out, Reject) and out.reason in ("nesting", "json", "header"), out
    assert (json_problem(h) is None) == (depth <= 16)  # the walk itself never recurses, at any depth


@SETTINGS
@given(
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.sampled_from(["fs", "meta"]),
)
def test_non_finite_numbers_in_a_header_are_refused(f, where):
    h = base_header()
    if where == "fs":
        h["fs"] = f
    else:
        h["meta"] = {"x": [f]}
    out = decode_ingest(frames_of(h), LIMITS)
    assert isinstance(out, Reject) and out.reason == "header", out


hostile_values = (
    json_values
    | surrogates
    | huge_ints
    | st.integers(5, 40).map(deep)
    | st.text(min_size=4_000, max_size=4_200, alphabet="ab")
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["label", "meta", "t0_ns", "fs", "seq"]), hostile_values, max_size=3))
def test_whatever_the_codec_accepts_the_store_can_hold(tmp_path_factory, changes):
    """The codec's bounds are the store's: an accepted event is stored, never an exception from SQLite or json."""
    from daemon.store.db import Store

    h = {**base_header(), **changes}
    out = decode_ingest(frames_of(h), LIMITS)
    check(out)
    if isinstance(out, Event):
        store = Store(tmp_path_factory.mktemp("store"))
        try:
            ids = store.ingest([out], [np.ones((1, 4), np.float32)], [], keep_raw=True)
            assert ids[0] > 0
        finally:
            store.close()


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(["label", "meta", "t0_ns", "fs", "seq", "x"]), hostile_values, max_size=4),
    st.booleans(),
)
def test_the_plain_header_shortcut_never_passes_what_the_walk_refuses(changes, ascii_only):
    # decode_ingest skips the walk for a header that plainly_bounded clears: that must never hide a problem
    h = {**base_header(), **changes}
    try:
        raw = json.dumps(h, ensure_ascii=ascii_only).encode("utf-8")
    except UnicodeEncodeError:  # a raw lone surrogate: not UTF-8, refused as "json" before any of this
        return
    if plainly_bounded(raw):
        assert json_problem(json.loads(raw)) is None, raw[:200]


def test_the_plain_header_shortcut_is_taken_by_an_ordinary_header_and_refuses_each_hostile_class():
    ordinary = encode_ingest(Event("s1", 3, 1_780_272_000 * 10**9, 20_800.0, "int16", 1, np.zeros((1, 64), "<i2")))[1]
    assert plainly_bounded(ordinary)  # t0_ns has 19 digits: still plain
    for hostile in (
        rb'{"a":"\ud800"}',
        b'{"a":9223372036854775808}',
        b'{"a":1e999}',
        b'{"a":NaN}',
        b"[" * 17 + b"]" * 17,
    ):
        assert not plainly_bounded(hostile), hostile
        assert json_problem(json.loads(hostile)) is not None
    assert not plainly_bounded(b'{"a":"' + b"x" * 4_100 + b'"}')  # longer than a string may be
