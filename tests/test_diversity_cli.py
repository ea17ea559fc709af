"""``wingbeat diversity``: windows of known events on a store built here (known clusters, times on either side of
UTC midnight, novel events, versions), bad flags, and against the real daemon: after a retrain the history is
re-labelled by the new serving version, while ``--as-served`` keeps the published clusters."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from harness import CONFIG, Daemon, cli, simulate, wait_for

from daemon.cli.clients import events_of, replay
from daemon.data.datasets import read_recordings
from daemon.report.windows import diversity_windows
from daemon.store.db import Store
from daemon.store.labels import window_filter
from daemon.store.versions import read_version
from model.predict import predict


def ns(text: str) -> int:
    t = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return int(t.timestamp()) * 10**9 + t.microsecond * 1000


def hill(counts: list[int]) -> dict[str, float]:
    p = np.array(counts, float) / sum(counts)
    return {"q0": float(len(counts)), "q1": float(np.exp(-(p * np.log(p)).sum())), "q2": float(1 / (p**2).sum())}


def put_events(
    state: Path, rows: Sequence[tuple[str, str, int, int | None, int, dict[int, int]]], versions: int
) -> None:
    """A store of ``rows`` (station, sensor, t0_ns, served version or None, published cluster, {version: its
    re-labelled cluster}); versions 1…``versions`` recorded as serving, the last one serving now."""
    store = Store(state)
    with store._tx():
        for i, (station, sensor, t0, served, cluster, labels) in enumerate(rows, start=1):
            store.db.execute(
                "INSERT INTO events (id, station, sensor, seq, t0_ns, fs, dtype, channels, n_samples, received_ns)"
                " VALUES (?, ?, ?, ?, ?, 9000.0, 'int16', 1, 8, 0)",
                (i, station, sensor, i, t0),
            )
            if served is not None:
                store.db.execute("INSERT INTO outputs VALUES (?, ?, ?, 1.0, 0.0, 0.0, '[]', 1)", (i, served, cluster))
            for v, label in labels.items():
                store.db.execute("INSERT INTO labels VALUES (?, ?, ?)", (v, i, label))
    for v in range(1, versions + 1):
        store.record_model(v, "serving", "full", {})
    store.close()


def build(state: Path, events: Sequence[tuple[str, str, str, int, int | None, int | None]], serving: int) -> None:
    """A store of ``events`` (station, sensor, UTC time, served version, published cluster, serving version's
    re-labelled cluster or None); versions 1…``serving`` recorded, the last serving."""
    rows = [
        (
            station,
            sensor,
            ns(t),
            version if cluster is not None else None,
            cluster or 0,
            {} if label is None else {serving: label},
        )
        for station, sensor, t, version, cluster, label in events
    ]
    put_events(state, rows, serving)


# (station, sensor, time, served by, published cluster, re-labelled cluster by the serving version 2)
EVENTS = [
    ("", "a", "2026-06-01T10:00:00", 1, 0, 5),
    ("", "a", "2026-06-01T11:00:00", 1, 0, 5),
    ("", "a", "2026-06-01T12:00:00", 1, 1, 6),
    ("", "b", "2026-06-01T23:59:59.999000", 1, -1, -1),  # novel, the last moment of 1 June
    ("", "a", "2026-06-02T00:00:00", 2, 5, None),  # the first of 2 June, served by version 2 itself
    ("", "a", "2026-06-02T01:00:00", 2, 5, None),
    ("", "b", "2026-06-02T02:00:00", 2, 7, None),
    ("", "a", "2026-06-02T03:00:00", 2, -1, None),
    ("", "a", "2026-06-02T04:00:00", 1, 1, None),  # served by 1, not re-labelled yet: pending under version 2
]


@pytest.fixture
def store(tmp_path) -> Path:
    build(tmp_path / "state", EVENTS, serving=2)
    return tmp_path / "state"


def test_day_windows_by_the_serving_version(store):
    r = cli("diversity", "--state", str(store), "--by", "day", "--json")
    assert r.returncode == 0, r.stderr
    days = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(d["start"], d["end"]) for d in days] == [
        ("2026-06-01T00:00:00+00:00", "2026-06-02T00:00:00+00:00"),
        ("2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00"),
    ]
    one, two = days
    assert (one["station"], one["events"], one["novel"], one["pending"], one["model_version"]) == ("", 4, 1, 0, 2)
    assert one["abundance"] == {"5": 2, "6": 1}  # version 2's labels, not the published 0 and 1
    assert (two["events"], two["novel"], two["pending"], two["model_version"]) == (4, 1, 1, 2)
    assert two["abundance"] == {"5": 2, "7": 1}
    for d, counts in ((one, [2, 1]), (two, [2, 1])):
        for q, value in hill(counts).items():
            assert math.isclose(d["observed"][q], value, rel_tol=1e-9)
        assert set(d["estimated"]) == set(d["ci95"]) == {"q0", "q1", "q2"}
        assert 0.0 <= d["coverage"] <= 1.0


def test_as_served_counts_the_published_clusters_and_names_every_version(store):
    days = diversity_windows(store, "day", as_served=True)
    one, two = days
    assert one["abundance"] == {"0": 2, "1": 1} and one["novel"] == 1 and one["model_version"] == 1
    assert one["served_by"] == {"1": 4}
    assert two["abundance"] == {"1": 1, "5": 2, "7": 1} and two["novel"] == 1 and two["pending"] == 0
    assert two["model_version"] == [1, 2] and two["served_by"] == {"1": 1, "2": 4}


def test_hours_weeks_all_and_filters(store):
    hours = diversity_windows(store, "hour")
    assert len(hours) == 9 and hours[3]["start"] == "2026-06-01T23:00:00+00:00" and hours[3]["novel"] == 1
    week = diversity_windows(store, "week")  # 1 June 2026 is a Monday
    assert [(w["start"], w["end"], w["events"]) for w in week] == [
        ("2026-06-01T00:00:00+00:00", "2026-06-08T00:00:00+00:00", 8)
    ]
    (whole,) = diversity_windows(store, "all")
    assert (whole["start"], whole["end"]) == ("2026-06-01T10:00:00+00:00", "2026-06-02T04:00:00+00:00")
    assert whole["abundance"] == {"5": 4, "6": 1, "7": 1} and whole["pending"] == 1
    b = diversity_windows(store, "day", sensor="b")
    assert [(w["events"], w["novel"]) for w in b] == [(1, 1), (1, 0)]
    since = diversity_windows(store, "day", since_ns=ns("2026-06-01T23:59:59.999"), until_ns=ns("2026-06-02T01:00"))
    assert [w["events"] for w in since] == [1, 1]


def test_a_centre_by_station_gives_the_network(tmp_path):
    events = [(s, "x", f"2026-06-0{d}T12:00:00", 1, c, None) for s, d, c in [
        ("north", 1, 0), ("north", 1, 0), ("north", 2, 1), ("south", 1, 1), ("south", 1, 2), ("south", 2, 2),
    ]]  # fmt: skip
    build(tmp_path / "centre", events, serving=1)
    r = cli("diversity", "--state", str(tmp_path / "centre"), "--by", "station", "--json")
    assert r.returncode == 0, r.stderr
    *stations, net = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(s["station"], s["abundance"]) for s in stations] == [
        ("north", {"0": 2, "1": 1}),
        ("south", {"1": 1, "2": 2}),
    ]
    n = net["network"]
    assert n["stations"] == ["north", "south"]
    assert n["bray_curtis"][0][1] == pytest.approx(1 - 2 * 1 / 6)  # shared: min(1, 1) of 3 + 3 events
    assert n["sorensen"][0][1] == pytest.approx(1 - 2 * 1 / 4)  # one shared cluster of 2 + 2
    assert n["gamma"]["q0"] == 3 and n["alpha"]["q0"] == 2 and n["beta"]["q0"] == pytest.approx(1.5)
    (pooled,) = diversity_windows(tmp_path / "centre", "all")
    assert pooled["station"] == "*" and pooled["events"] == 6
    assert [w["station"] for w in diversity_windows(tmp_path / "centre", "day", station="south")] == ["south"] * 2
    table = cli("diversity", "--state", str(tmp_path / "centre"), "--by", "station")
    assert table.returncode == 0 and "bray_curtis" in table.stdout and "north" in table.stdout


def test_the_table(store):
    r = cli("diversity", "--state", str(store))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["station", "start", "events"]
    assert lines[1].split()[1:5] == ["2026-06-01T00:00:00Z", "4", "1", "0"]
    assert "1 events are not labelled by the serving version yet" in r.stdout


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--by", "month"], "month"),
        (["--since", "yesterday"], "--since: not an ISO 8601 time or ns since epoch: 'yesterday'"),
        (["--since", "2026-06-02", "--until", "2026-06-01"], "--until (2026-06-01) must come after --since"),
        (["--json", "--until", "2026-13-01"], "--until"),
    ],
)
def test_bad_flags_exit_2(store, flags, says):
    r = cli("diversity", "--state", str(store), *flags)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr


def test_no_store_is_one_line(tmp_path):
    r = cli("diversity", "--state", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no store" in r.stderr


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory, 320, 3, 1)


@pytest.mark.slow
def test_a_retrain_relabels_the_history_and_as_served_keeps_what_was_published(tmp_path, sim):
    config = tmp_path / "wingbeat.toml"
    config.write_text(CONFIG.replace("gate_ari_tolerance = 0.5", "gate_ari_tolerance = 2.0"))  # the swap is tested
    d = Daemon(tmp_path / "state", config)

    def windows(*flags: str) -> list[dict]:
        r = cli("diversity", "--state", str(d.state), "--by", "all", "--json", *flags)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    try:
        res = replay(events_of(read_recordings(sim), "replay", 0, True), d.ingest, window=64, give_up_s=60)
        assert res.acked == 320
        wait_for(lambda: (s := d.status())["serving"] == 1 and s["outputs"] == 320, timeout=240, every=1)
        (first,) = windows()
        assert (first["model_version"], first["events"], first["pending"]) == (1, 320, 0)
        assert cli("retrain", "--state", str(d.state)).returncode == 0
        wait_for(lambda: d.status()["serving"] == 2, timeout=240, every=1)
        # until version 2 has re-labelled everything, what it has not reached is pending, never counted as its own
        (relabelled,) = wait_for(lambda: (w := windows()) and w[0]["pending"] == 0 and w, timeout=120, every=1)
        (served,) = windows("--as-served")
        logged = [e for e in d.events() if e.get("event") == "relabelled"]
    finally:
        assert d.stop() == 0
    assert relabelled["model_version"] == 2 and relabelled["events"] == 320
    assert logged and logged[-1]["model_version"] == 2 and logged[-1]["events"] == 320
    store = Store(d.state, readonly=True)
    ids, x, _ = store.training_set(1000)
    published = store.outputs_for(ids)
    store.close()
    v2 = read_version(d.state / "models" / "v2")
    expected = predict(v2, x).cluster
    assert served["model_version"] == 1 and served["served_by"] == {"1": 320}
    assert served["abundance"] == {
        str(c): int(n) for c, n in zip(*np.unique(published[published >= 0], return_counts=True), strict=True)
    }
    got = relabelled["abundance"]
    want = {str(c): int(n) for c, n in zip(*np.unique(expected[expected >= 0], return_counts=True), strict=True)}
    # one torch thread in the re-labeller, several here: an event on a boundary may fall either way
    assert sum(abs(got.get(k, 0) - want.get(k, 0)) for k in {*got, *want}) <= 2
    assert relabelled["novel"] == pytest.approx(int((expected < 0).sum()), abs=2)

    # re-labelling resumes where it stopped: the watermark is the highest event it labelled
    from daemon.serve.relabel import relabel

    store = Store(d.state)
    batches = iter([True, True, False])
    assert relabel(store, v2, 9, batch=50, keep_going=lambda: next(batches)) == 100
    assert store.relabelled_to(9) == 100 and store.relabel_left(9) == 220
    assert relabel(store, v2, 9, batch=50) == 220
    rows = store.db.execute("SELECT event_id, cluster FROM labels WHERE version = 9 ORDER BY event_id").fetchall()
    assert [r[0] for r in rows] == list(range(1, 321))
    assert np.mean(np.array([r[1] for r in rows]) == expected) > 0.99
    assert store.prune_labels(keep=9) == 320  # version 2's rows
    store.close()


# ---- the window counts against a count in Python -----------------------------------------------------------------
WIDTHS = {"hour": (3_600 * 10**9, 0), "day": (86_400 * 10**9, 0), "week": (7 * 86_400 * 10**9, 3 * 86_400 * 10**9)}


def random_store(state: Path, seed: int, huge: bool = False) -> list[tuple[str, str, int, int | None, int, dict]]:
    """Events of four stations (one of them ''), two sensors, times on either side of 1970 and of UTC midnights and
    Mondays, served by versions 1…3 or not at all (pending), novel (−1) or of clusters 0…7, and labels of versions 2
    and 3 (serving) for some events others served. ``huge``: a cluster and a version too big for a packed key.
    Returns (station, sensor, t0_ns, served version, published cluster, {version: label})."""
    rng = np.random.default_rng(seed)
    day = 86_400 * 10**9
    times = [*(ns("2026-06-01T00:00") + rng.integers(-20 * day, 20 * day, 300)), *rng.integers(-9 * day, 9 * day, 60)]
    times += [ns("2026-06-01T00:00"), ns("2026-06-01T00:00") - 1, 0, -1, -3 * day, -3 * day - 1, ns("2026-06-08")]
    events = []
    for t in times:
        served = None if rng.random() < 0.1 else int(rng.integers(1, 4))
        cluster = -1 if rng.random() < 0.15 else int(rng.integers(0, 8))
        labels = {v: -1 if rng.random() < 0.1 else int(rng.integers(0, 8)) for v in (2, 3) if rng.random() < 0.7}
        station, sensor = str(rng.choice(["", "north", "south", "zé"])), str(rng.choice(["a", "b"]))
        events.append((station, sensor, int(t), served, cluster, labels))
    if huge:
        events[0] = (*events[0][:3], 2**40, 2**41, {3: -(2**45)})
    put_events(state, [(*e[:5], {v: lab for v, lab in e[5].items() if v != e[3]}) for e in events], versions=3)
    return events


def counted(events: list, by: str, version: int | None, keep) -> tuple[list, list]:
    """(totals, counts) as the store gives them, counted one event at a time: counts under ``version``, or as
    served (with the version) when None."""
    totals: dict[tuple, list[int]] = {}
    counts: dict[tuple, int] = {}
    for station, sensor, t0, served, cluster, labels in events:
        if not keep(station, sensor, t0):
            continue
        width, offset = WIDTHS.get(by, (0, 0))
        w = (t0 + offset) // width if width else 0
        n, lo, hi = totals.get((station, w), (0, t0, t0))
        totals[station, w] = [n + 1, min(lo, t0), max(hi, t0)]
        if version is None and served is not None:
            key: tuple = (station, w, served, cluster)
        elif version is not None and served == version:
            key = (station, w, cluster)
        elif version is not None and version in labels:
            key = (station, w, labels[version])
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return sorted((*k, *v) for k, v in totals.items()), sorted((*k, n) for k, n in counts.items())


@pytest.mark.parametrize("huge", [False, True])
def test_the_window_counts_are_a_count_of_the_events(tmp_path, huge):
    events = random_store(tmp_path / "state", seed=7, huge=huge)
    store = Store(tmp_path / "state", readonly=True)
    statements: list[str] = []
    store.db.set_trace_callback(statements.append)
    since, until = ns("2026-05-20T05:00"), ns("2026-06-03T17:00")
    filters = [
        ((None, None, None, None), lambda s, x, t: True),
        (("north", None, None, None), lambda s, x, t: s == "north"),
        ((None, "b", since, until), lambda s, x, t: x == "b" and since <= t < until),
        (("", "a", None, 0), lambda s, x, t: s == "" and x == "a" and t < 0),
    ]
    try:
        for (station, sensor, lo, hi), keep in filters:
            where, args = window_filter(station, sensor, lo, hi)
            for by in ("hour", "day", "week", "station"):
                totals, served = counted(events, by, None, keep)
                assert sorted(store.window_totals(by, where, args)) == totals
                assert sorted(store.window_counts_served(by, where, args)) == served
                for version in (1, 2, 3):
                    assert (
                        sorted(store.window_counts(by, version, where, args)) == counted(events, by, version, keep)[1]
                    )
    finally:
        store.close()
    # packed keys, not GROUP BY (its sort is what took the time), unless a value does not fit in one
    assert any("GROUP BY" in s for s in statements) == huge
    everything = diversity_windows(tmp_path / "state", "all")
    totals, counts = counted(events, "all", 3, lambda s, x, t: True)
    assert [(w["station"], w["events"], w["novel"], w["pending"]) for w in everything] == [
        (
            "*",
            sum(n for *_, n in counts),
            sum(n for _, _, c, n in counts if c == -1),
            len(events) - sum(n for *_, n in counts),
        )
    ]
