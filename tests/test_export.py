"""``wingbeat export``: CSV and npz with the event's meta, Parquet read back with pyarrow (types, the latent list
column), and a Darwin Core Archive read back with a DwC-A reader, its counts summed against the store. A real
SQLite store written through the Store API, the real command line."""

from __future__ import annotations

import csv
import json
import zipfile
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from harness import cli

from daemon.protocol import Output, Pooled
from daemon.store.db import Store

DAY = 86_400 * 10**9
START = 1_780_272_000 * 10**9  # 2026-06-01T00:00:00Z
STATIONS = ("s1", "s2")


def plan() -> list[tuple[str, int, int, str]]:
    """(station, t0_ns, cluster, label) of every event: known counts per station, day and cluster."""
    out = []
    for s, station in enumerate(STATIONS):
        for day in range(3):
            for cluster, n in ((0, 5 + day), (1, 3 + s), (2, 2 * s), (-1, 1)):
                for k in range(n):
                    t = START + day * DAY + (2 + cluster + 3 * k) * 3_600 * 10**9 + s * 10**6
                    out.append((station, t, cluster, "Aedes <aegypti>" if cluster == 0 else ""))
    return out


def card(cluster: int, f0: float | None) -> dict:
    return {
        "cluster": cluster,
        "size": 100 + cluster,
        "f0_hz": f0,
        "f0_iqr_hz": [f0 - 10, f0 + 10] if f0 else None,
        "f0_of_mean_hz": f0,
        "harmonics": [1.0, 0.5, 0.25, 0.1] if f0 else None,
        "mean_spectrum": np.linspace(0, 1, 2 * 193).reshape(2, 193).round(3).tolist(),
        "species": {"Aedes <aegypti>": 90} if cluster == 0 else {},
    }


def make_state(state: Path) -> list[tuple[str, int, int, str]]:
    """A centre's store with the events of ``plan``, outputs of model version 3, and v3's manifest with cards."""
    events = plan()
    store = Store(state)
    try:
        pooled = [
            Pooled(st, "trap", i, t0, 20_800.0, "int16", 2, 4096, label, {"file": f"d/{i}.wav", "note": "a,b\t\"c\""},
                   np.zeros(4, np.float32).tobytes(), None)
            for i, (st, t0, _, label) in enumerate(events)
        ]  # fmt: skip
        ids = store.ingest_pooled(pooled, [])
        store.add_outputs(
            [
                Output(eid, "trap", i, t0, 3, c, 0.9, 0.1 if c >= 0 else 0.99, 0.01 * i, (0.5, -1.25, float(i), 2.0))
                for i, (eid, (_, t0, c, _)) in enumerate(zip(ids, events, strict=True))
            ]
        )
        store.record_model(3, "serving", "full", {})
    finally:
        store.close()
    v = state / "models" / "v3"
    v.mkdir(parents=True)
    manifest = {"features": {"f_max": 2000.0, "df": 10.4}, "cards": [card(0, 412.5), card(1, 180.0), card(2, None)]}
    (v / "manifest.json").write_text(json.dumps(manifest))
    return events


@pytest.fixture(scope="module")
def centre(tmp_path_factory) -> tuple[Path, list[tuple[str, int, int, str]]]:
    state = tmp_path_factory.mktemp("centre") / "state"
    return state, make_state(state)


def test_csv_and_npz_carry_the_meta_column(tmp_path, centre):
    state, events = centre
    r = cli("export", "--state", str(state), "--out", str(tmp_path / "o.csv"))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "o.csv", newline="")))
    assert len(rows) == len(events)
    assert json.loads(rows[7]["meta"]) == {"file": "d/7.wav", "note": 'a,b\t"c"'}
    assert Counter(r["station"] for r in rows) == Counter(e[0] for e in events)
    r = cli("export", "--state", str(state), "--out", str(tmp_path / "o.npz"), "--station", "s2")
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "o.npz", allow_pickle=False) as z:
        assert z["meta"].dtype.kind == "U" and len(z["meta"]) == sum(e[0] == "s2" for e in events)
        assert json.loads(str(z["meta"][0]))["file"].endswith(".wav") and set(z["station"].tolist()) == {"s2"}
        assert z["latent"].shape == (len(z["meta"]), 4)


def test_parquet_has_typed_columns(tmp_path, centre):
    state, events = centre
    since = "2026-06-02T00:00:00"  # UTC: the first day is left out
    r = cli("export", "--state", str(state), "--out", str(tmp_path / "o.parquet"), "--since", since)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "o.parquet")
    assert t.num_rows == sum(e[1] >= START + DAY for e in events)
    s = t.schema
    assert s.field("t0").type == pa.timestamp("ns", tz="UTC") and s.field("received").type == pa.timestamp("ns", "UTC")
    assert s.field("latent").type == pa.list_(pa.float32())
    assert s.field("event_id").type == pa.int64() and s.field("cluster").type == pa.int64()
    assert s.field("probability").type == pa.float64() and s.field("meta").type == pa.string()
    d = t.to_pylist()
    assert d[0]["latent"] == [0.5, -1.25, pytest.approx(d[0]["seq"]), 2.0]
    first = min(e[1] for e in events if e[1] >= START + DAY)
    assert min(row["t0"] for row in d).timestamp() == first / 1e9
    assert all(json.loads(row["meta"])["file"] == f"d/{row['seq']}.wav" for row in d)


def test_darwin_core_archive_reads_back_with_counts_that_sum_to_the_store(tmp_path, centre):
    from dwca.read import DwCAReader

    state, events = centre
    out = tmp_path / "dwca.zip"
    r = cli("export", "--state", str(state), "--format", "dwca", "--out", str(out), "--title", "Trap <1> & co")
    assert r.returncode == 0, r.stderr
    assert "6 sampling events" in r.stdout
    dwc = "http://rs.tdwg.org/dwc/terms/"
    with DwCAReader(str(out)) as a:
        assert a.descriptor.core.type == dwc + "Event"
        assert {e.type for e in a.descriptor.extensions} == {dwc + "Occurrence", "http://rs.tdwg.org/eco/terms/Event"}
        assert a.metadata.find("dataset/title").text == "Trap <1> & co"  # parsed as XML: escaped when written
        for tag in ("creator", "contact", "abstract", "pubDate", "intellectualRights"):
            assert a.metadata.find(f"dataset/{tag}") is not None, tag
        rows = list(a)
        assert len(rows) == 6  # 2 stations × 3 days
        total: Counter[tuple[str, int, int]] = Counter()
        for row in rows:
            station = row.data[dwc + "locationID"]
            day = (int(row.data[dwc + "eventDate"][8:10]) - 1) if row.data[dwc + "eventDate"][:8] == "2026-06-" else -1
            assert row.data[dwc + "eventDate"].endswith("T00:00:00Z") and "/" in row.data[dwc + "eventDate"]
            occ = [x for x in row.extensions if x.rowtype == dwc + "Occurrence"]
            eco = [x for x in row.extensions if x.rowtype.startswith("http://rs.tdwg.org/eco/")]
            assert len(eco) == 1
            assert eco[0].data["http://rs.tdwg.org/eco/terms/samplingEffortUnit"] == "sensor hours"
            hours = {
                (e[1] - START) // (3_600 * 10**9) for e in events if e[0] == station and (e[1] - START) // DAY == day
            }
            assert (
                int(row.data[dwc + "sampleSizeValue"])
                == len(hours)
                == int(eco[0].data["http://rs.tdwg.org/eco/terms/samplingEffortValue"])
            )
            for o in occ:
                d = o.data
                assert d[dwc + "basisOfRecord"] == "MachineObservation" and d[dwc + "occurrenceStatus"] == "present"
                assert (
                    d[dwc + "organismQuantityType"] == "individuals" and d[dwc + "identifiedBy"] == "Wingbeat model v3"
                )
                name = d[dwc + "scientificName"]
                cluster = -1 if "novel" in name else int(name.rsplit(" ", 1)[1])
                assert name.startswith("Wingbeat v3 ")
                total[(station, day, cluster)] += int(d[dwc + "organismQuantity"])
                if cluster == 0:
                    assert "412.5 Hz" in d[dwc + "identificationRemarks"]
                if cluster == 2:
                    assert "no wing-beat f0" in d[dwc + "identificationRemarks"]
    want = Counter((s, (t - START) // DAY, c) for s, t, c, _ in events)
    assert total == want and sum(total.values()) == len(events)


def test_darwin_core_meta_xml_structure(tmp_path, centre):
    state, _ = centre
    out = tmp_path / "w.zip"
    r = cli("export", "--state", str(state), "--format", "dwca", "--by", "week", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2 sampling events" in r.stdout  # 2026-06-01 is a Monday: the three days are one ISO week
    with zipfile.ZipFile(out) as z:
        meta = ET.fromstring(z.read("meta.xml"))
        eml = ET.fromstring(z.read("eml.xml"))
        files = {n: z.read(n).decode().splitlines() for n in ("event.txt", "occurrence.txt", "humboldt.txt")}
    ns = "{http://rs.tdwg.org/dwc/text/}"
    assert meta.tag == ns + "archive" and meta.get("metadata") == "eml.xml"
    parts = [c for c in meta if c.tag in (ns + "core", ns + "extension")]
    assert [p.tag for p in parts] == [ns + "core", ns + "extension", ns + "extension"]
    for p in parts:
        loc = p.find(f"{ns}files/{ns}location").text
        header = files[loc][0].split("\t")
        fields = p.findall(ns + "field")
        assert [int(f.get("index")) for f in fields] == list(range(len(header)))
        assert all(f.get("term").rsplit("/", 1)[1] == h for f, h in zip(fields, header, strict=True))
        key = p.find(ns + ("id" if p.tag == ns + "core" else "coreid"))
        assert key is not None and key.get("index") == "0"
        assert all(len(line.split("\t")) == len(header) for line in files[loc][1:])
    assert eml.tag == "{eml://ecoinformatics.org/eml-2.1.1}eml" and eml.get("packageId")
    assert [c.tag for c in eml.find("dataset")][:3] == ["title", "creator", "pubDate"]


def test_bad_export_arguments_say_one_line(tmp_path, centre):
    state, _ = centre
    for args, words in (
        (["--out", str(tmp_path / "x.txt")], "x.txt"),
        (["--out", str(tmp_path / "x.csv"), "--format", "dwca"], "x.csv"),
        (["--out", str(tmp_path / "x.csv"), "--since", "yesterday"], "yesterday"),
        (["--out", str(tmp_path / "x.zip"), "--format", "dwca", "--since", "2026-06-03", "--until", "2026-06-02"],
         "--until"),
    ):  # fmt: skip
        r = cli("export", "--state", str(state), *args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
