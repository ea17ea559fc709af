"""The network's pure parts (daemon/net/link.py): the event message, model versions as objects, the [network]
table, and the store's schema 3 (events unique by station, sensor, seq). Fast: no server."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import numpy as np
import pytest

from daemon.net.wire import (
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
