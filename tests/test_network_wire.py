"""The network's pure parts (daemon/net/link.py): the event message, model versions as objects, the [network]
table, and the store's schema 3 (events unique by station, sensor, seq). Fast: no server."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.net.wire import (
    REASONS,
    WireError,
    decode_event,
    encode_event,
    msg_id,
    pack_version,
    stale_versions,
    unpack_version,
)
from daemon.ops.config import ConfigError, load
from daemon.protocol import Pooled
from daemon.store.db import DB_NAME, Store
from daemon.store.schema import MIGRATIONS
from model.checkpoint import FILES

FEATURES = {"nperseg": 256, "bins": 64}


def row(raw: bytes | None = None, channels: int = 2, bins: int = 3) -> tuple:
    data = np.arange(channels * bins, dtype=np.float32).tobytes()
    meta = json.dumps({"site": "a"})
    return (7, "trap.1", 42, 123, 20800.0, "int16", channels, 4, "Aedes", meta, data, raw)


def test_an_event_message_round_trips_with_and_without_raw_samples():
    for raw in (None, np.arange(8, dtype="<i2").tobytes()):
        subject, body, mid = encode_event("s1", row(raw), FEATURES)
        assert subject == "wingbeat.events.s1.trap.1" and mid == msg_id("s1", "trap.1", 42) == "s1/trap.1/42"
        p = decode_event(body, FEATURES)
        assert p == Pooled("s1", "trap.1", 42, 123, 20800.0, "int16", 2, 4, "Aedes", {"site": "a"}, row()[10], raw)


def test_malformed_messages_name_what_is_wrong():
    _, body, _ = encode_event("s1", row(), FEATURES)
    n = int.from_bytes(body[:4], "big")
    header = json.loads(body[4 : 4 + n])

    def with_header(**change):
        h = json.dumps({**header, **change}).encode()
        return len(h).to_bytes(4, "big") + h + body[4 + n :]

    cases = {
        "frame": [b"", b"\x00\x00", (10**6).to_bytes(4, "big") + b"{}"],
        "json": [(3).to_bytes(4, "big") + b"\xff\xfe{"],
        "header": [
            with_header(v=2),
            with_header(station="a.b"),
            with_header(sensor=""),
            with_header(seq=-1),
            with_header(seq="1"),
            with_header(dtype="complex"),
            with_header(channels=True),
        ],
        "features": [body[:-4], with_header(features={**header["features"], "config": {"bins": 9}})],
        "raw": [with_header(raw_bytes=2) + b"\x00\x00"],
    }
    for reason, bodies in cases.items():
        for b in bodies:
            with pytest.raises(WireError) as e:
                decode_event(b, FEATURES)
            assert e.value.reason == reason, (reason, e.value)
    assert decode_event(with_header(features={**header["features"], "config": {"bins": 9}}), None)  # any config


def test_a_model_version_travels_as_a_tar_of_its_three_files_and_nothing_else(tmp_path):
    src = tmp_path / "v3"
    src.mkdir()
    for name in FILES:
        (src / name).write_bytes(name.encode() * 3)
    out = unpack_version(pack_version(src), tmp_path / "incoming" / "v3")
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert all((out / f).read_bytes() == (src / f).read_bytes() for f in FILES)
    for evil in ("../x", "/etc/passwd", "weights.safetensors/../../x"):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(evil)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
        with pytest.raises(ValueError, match="unexpected member"):
            unpack_version(buf.getvalue(), tmp_path / "bad")
        assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()


def test_network_table_is_validated(tmp_path):
    def cfg(text: str):
        p = tmp_path / "c.toml"
        p.write_text(text)
        return load(p)

    assert cfg("").network.nats == ""  # off by default: a single daemon
    c = cfg('[network]\nnats = "nats://127.0.0.1:4222"\nstation = "s-1_a"\n')
    assert c.network.station == "s-1_a" and not c.network.train_locally and not c.network.forward_raw
    for text, key in [
        ('[network]\nnats = "nats://127.0.0.1:4222"\n', "network.station"),
        ('[network]\nnats = "http://x"\nstation = "a"\n', "network.nats"),
        ('[network]\nstation = "a.b"\n', "network.station"),
        ('[network]\nnats = "nats://h:1"\nstation = "a"\ntls_cert = "c.pem"\n', "network.tls_cert"),
        ("[network]\nreplicas = 7\n", "network.replicas"),
        ("[network]\nkeep_versions = 0\n", "network.keep_versions"),
        ('[network]\nnats = "tls://h:1"\nstation = "a"\ntls_ca = "/nonexistent/ca.pem"\n', "network.tls_ca"),
    ]:
        with pytest.raises(ConfigError, match=key):
            cfg(text)


V1 = Path(__file__).parent / "data" / "store-v1.sqlite"


def test_a_schema_2_store_migrates_to_events_unique_by_station(tmp_path):
    shutil.copy(V1, tmp_path / DB_NAME)
    db = sqlite3.connect(tmp_path / DB_NAME)
    for statement in MIGRATIONS[1]:  # make it a schema-2 store
        db.execute(statement)
    db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    st = Store(tmp_path)
    assert st.migrated is not None and st.migrated[0] == 2 and st.integrity_ok()
    assert st.summary()["events"] == 30 and st.summary()["per_station"] == {"": 30}
    sensor, seq = st.db.execute("SELECT sensor, seq FROM events ORDER BY id LIMIT 1").fetchone()
    assert st.last_seqs()[sensor] >= seq
    one = Pooled("s1", sensor, seq, 0, 1000.0, "int16", 1, 64, "", {}, b"\x00" * 8, None)
    assert st.ingest_pooled([one], [])[0] > 30  # the same (sensor, seq) from a station is another event
    assert st.ingest_pooled([one], []) == [-1]  # and once only
    ids = [r[0] for r in st.outbox(0, 100, raw=False)]  # the daemon's own events with features, oldest first
    assert ids and ids == sorted(ids) and max(ids) <= 30
    assert st.forwarded() == 0
    st.set_forwarded(12)
    assert st.forwarded() == 12 and st.outbox_depth(12)[0] == 30 - 12
    st.close()


def test_the_bucket_keeps_the_newest_versions_by_number_not_by_name():
    names = ["v9", "v10", "v2", "notes", "v1", "v011x"]
    assert stale_versions(names, 2) == ["v1", "v2"]  # v10 is newer than v9; "notes" and "v011x" are not versions
    assert stale_versions(names, 4) == [] and stale_versions([], 1) == []
    assert stale_versions(["v3", "v1", "v2"], 1) == ["v1", "v2"]


# ---- hostile messages at the centre: surrogates, 2^64, 400-digit numbers, deep nesting, NaN features -------------
def hostile(**change: object) -> bytes:
    """A good event message with its header changed; values are written as JSON text (``raw`` keeps them verbatim)."""
    _, body, _ = encode_event("s1", row(), FEATURES)
    n = int.from_bytes(body[:4], "big")
    header = json.loads(body[4 : 4 + n])
    raw = change.pop("raw", None)
    text = json.dumps({**header, **change})
    if raw is not None:
        key, value = raw  # type: ignore[misc]
        text = text.replace(f'"{key}": {json.dumps(header[key])}', f'"{key}": {value}', 1)
        assert value in text
    h = text.encode()
    return len(h).to_bytes(4, "big") + h + body[4 + n :]


def deep(depth: int) -> object:
    """A value nested ``depth`` lists deep, built without recursion."""
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def nested(depth: int) -> str:
    return "[" * depth + "0" + "]" * depth


HOSTILE = {
    "encoding": [hostile(label="\ud800"), hostile(meta={"note": "\udfff"}), hostile(meta={"\ud800": 1})],
    "header": [
        hostile(seq=2**64),
        hostile(t0_ns=2**64),
        hostile(channels=2**64),
        hostile(n_samples=2**64),
        hostile(raw=("fs", "9" * 400)),  # float() of it raised OverflowError inside decode
        hostile(raw=("seq", "1" + "0" * 399)),
        hostile(fs=float("inf")),
        hostile(raw=("fs", "1e999")),
        hostile(raw=("fs", "NaN")),
        hostile(channels=9),
        hostile(n_samples=10**12),
        hostile(meta={"n": 2**64}),
    ],
    "nesting": [hostile(raw=("meta", '{"m": ' + nested(40) + "}"))],
    "json": [hostile(raw=("meta", '{"m": ' + nested(7_000) + "}"))],  # past the parser's own limit
    "frame": [hostile(raw=("meta", '{"m": ' + nested(10_000) + "}"))],  # 10,000 deep: past the header cap
    "features": [],  # NaN features: made below
    "subject": [],  # made below
}


def nan_features() -> bytes:
    _, body, _ = encode_event("s1", row(), FEATURES)
    return body[:-4] + np.float32(np.nan).tobytes()


@pytest.mark.parametrize("reason", sorted(HOSTILE))
def test_hostile_messages_are_wire_errors_with_their_reason(reason):
    bodies = HOSTILE[reason] or ([nan_features()] if reason == "features" else [])
    for body in bodies:
        with pytest.raises(WireError) as e:
            decode_event(body, FEATURES, "wingbeat.events.s1.trap.1")
        assert e.value.reason == reason, e.value


def test_the_station_is_the_subjects_and_the_message_id_is_checked():
    subject, body, mid = encode_event("s1", row(), FEATURES)
    assert decode_event(body, FEATURES, subject, mid).station == "s1"
    forged = encode_event("B", row(), FEATURES)[1]  # station A's credentials, a body that says B
    for args in [
        (forged, subject, None),  # body B on A's subject
        (body, "wingbeat.events.s1.other", None),  # another sensor
        (body, "wingbeat.events.s1", None),  # no sensor at all
        (body, subject, "B/trap.1/42"),  # B's message ID: the server would drop B's own event as a duplicate
        (body, subject, "s1/trap.1/43"),
    ]:
        with pytest.raises(WireError) as e:
            decode_event(args[0], FEATURES, args[1], args[2])
        assert e.value.reason == "subject", args


def test_features_in_the_pooled_training_set_are_finite(tmp_path):
    """A store written before the checks may hold a NaN vector: training never sees it."""
    store = Store(tmp_path)
    good = np.ones(6, np.float32).tobytes()
    bad = np.r_[np.ones(5), np.nan].astype(np.float32).tobytes()
    rows = [Pooled("s1", "a", k, 0, 1000.0, "int16", 1, 64, "", {}, bad if k == 2 else good, None) for k in range(4)]
    ids = store.ingest_pooled(rows, [])
    got, x, _ = store.training_set(100)
    assert list(got) == [i for k, i in enumerate(ids) if k != 2] and np.isfinite(x).all()
    store.close()


def test_one_pooled_event_the_store_cannot_hold_is_quarantined_the_rest_stored(tmp_path):
    from daemon.protocol import REFUSED

    store = Store(tmp_path)
    ok = Pooled("s1", "a", 1, 0, 1000.0, "int16", 1, 64, "", {}, b"\x00" * 8, None)
    bad = [
        Pooled("s1", "a", 2, 0, 1000.0, "int16", 1, 64, "\ud800", {}, b"\x00" * 8, None),
        Pooled("s1", "a", 2**64, 0, 1000.0, "int16", 1, 64, "", {}, b"\x00" * 8, None),
        Pooled("s1", "a", 4, 0, 1000.0, "int16", 1, 64, "", {"m": deep(10_000)}, b"\x00" * 8, None),
    ]
    later = Pooled("s1", "a", 5, 0, 1000.0, "int16", 1, 64, "", {}, b"\x00" * 8, None)
    ids = store.ingest_pooled([ok, *bad, later], [])
    assert ids[0] > 0 and ids[4] > 0 and ids[1:4] == [REFUSED] * 3
    q = store.db.execute("SELECT reason, detail, seq, endpoint FROM quarantine ORDER BY id").fetchall()
    assert [r[0] for r in q] == ["store"] * 3 and all(r[3] == "nats" for r in q)
    assert "UnicodeEncodeError" in q[0][1] and "OverflowError" in q[1][1] and q[1][2] is None
    assert store.summary()["events"] == 2
    store.close()


def test_every_quarantine_reason_is_a_metric_label():
    from prometheus_client import generate_latest

    from daemon.net.versions import REFUSALS
    from daemon.net.wire import REASONS
    from daemon.ops.metrics import Metrics

    text = generate_latest(Metrics().registry).decode()
    for reason in REASONS:
        assert f'wingbeat_network_quarantined_total{{reason="{reason}"}} 0.0' in text
    for reason in REFUSALS:
        assert f'wingbeat_network_versions_refused_total{{reason="{reason}"}} 0.0' in text


hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from([2**64, 10**399, -(2**63) - 1]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids, max_size=3),
    max_leaves=8,
)  # fmt: skip
KEYS = ["station", "sensor", "seq", "t0_ns", "fs", "dtype", "channels", "n_samples", "label", "meta", "raw_bytes"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), hostile_values, max_size=3))
def test_decode_event_raises_only_wire_errors_and_what_it_accepts_is_stored(tmp_path, changes):
    try:
        p = decode_event(hostile(**changes), FEATURES, "wingbeat.events.s1.trap.1")
    except WireError as e:
        assert e.reason in REASONS
        return
    store = Store(tmp_path / f"s{abs(hash(repr(changes)))}")
    try:
        assert store.ingest_pooled([p], [])[0] > 0 or store.ingest_pooled([p], [])[0] == -1
    finally:
        store.close()


class FakeBucket:
    """An object store listing and its objects, counting downloads."""

    def __init__(self, objects: dict[str, bytes | Exception], sizes: dict[str, int] | None = None) -> None:
        self.objects, self.sizes, self.gets = objects, sizes or {}, Counter[str]()

    async def list(self):
        return [
            SimpleNamespace(name=n, deleted=False, size=self.sizes.get(n, len(o) if isinstance(o, bytes) else 10))
            for n, o in self.objects.items()
        ]

    async def get(self, name: str):
        self.gets[name] += 1
        o = self.objects[name]
        if isinstance(o, Exception):
            raise o
        return SimpleNamespace(data=o)


def watch(tmp_path: Path, bucket: FakeBucket, turns: int) -> tuple[Any, list]:
    """``turns`` polls of a station's version watcher against ``bucket``; (the watcher, what it logged)."""
    import asyncio
    import queue

    from daemon.net.versions import BucketVersions
    from daemon.ops.metrics import Metrics

    logged: list = []

    class Watcher(BucketVersions):
        async def _retrying(self, what, step):
            for _ in range(turns):
                await step()

        async def _bucket(self, js):
            return bucket

    w = Watcher()
    w.state, w.serving, w.refused_versions, w.versions, w.metrics = tmp_path, 1, set(), queue.Queue(), Metrics()
    w.log = SimpleNamespace(info=lambda *a, **k: None, error=lambda *a, **k: logged.append((a, k)))

    async def go():
        real = asyncio.sleep
        asyncio.sleep = lambda s: real(0)  # the watcher's 2 s poll, at once
        try:
            await w._watch_versions(None)
        finally:
            asyncio.sleep = real

    asyncio.run(go())
    return w, logged


def test_a_bad_version_is_refused_once_counted_and_never_fetched_again(tmp_path):
    from nats.js.errors import DigestMismatchError

    from daemon.net.wire import MAX_VERSION_BYTES

    src = tmp_path / "src"
    src.mkdir()
    for name in FILES:
        (src / name).write_bytes(b"x")
    cases = {
        "size": FakeBucket({"v2": b"tiny"}, sizes={"v2": MAX_VERSION_BYTES + 1}),  # refused from the listing
        "digest": FakeBucket({"v2": DigestMismatchError()}),
        "unpack": FakeBucket({"v2": b"not a tar at all" * 100}),
    }
    for reason, bucket in cases.items():
        w, logged = watch(tmp_path / reason, bucket, turns=5)
        assert bucket.gets["v2"] == (0 if reason == "size" else 1), reason  # once at most, never again
        assert w.refused_versions == {2} and w.versions.empty() and len(logged) == 1
        assert logged[0][1]["reason"] == reason
        assert w.metrics.net_versions_refused.labels(reason)._value.get() == 1
    good = FakeBucket({"v2": pack_version(src)})
    w, logged = watch(tmp_path / "good", good, turns=3)
    assert good.gets["v2"] == 1 and w.versions.get_nowait()[0] == 2 and not logged
