"""Simulated deployments with truth (``wingbeat simulate --days``): communities that change by day, species that
appear and vanish, diel activity, a species table drawn by the seed."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from harness import cli

from daemon.data.datasets import read_recordings
from daemon.data.simulate import (
    COMMUNITIES,
    Community,
    SimConfig,
    community_from,
    hill,
    simulate,
    simulate_deployment,
)

DAY_NS = 86_400 * 10**9


def small(seed: int, days: int = 4, events: int = 240, com: Community | None = None):
    return simulate_deployment(SimConfig(events=events, seed=seed, min_duration=0.02, max_duration=0.05), days,
                               com or COMMUNITIES["changing"])  # fmt: skip


def test_hill_numbers_known_answers():
    assert hill(np.array([5, 5])) == {"q0": 2.0, "q1": pytest.approx(2.0), "q2": pytest.approx(2.0)}
    h = hill(np.array([2, 1, 1, 0]))  # p = 1/2, 1/4, 1/4
    assert h["q0"] == 3
    assert h["q1"] == pytest.approx(np.exp(1.5 * np.log(2)))  # H = ½ln2 + 2·¼ln4 = 1.5 ln 2 → 2^1.5
    assert h["q2"] == pytest.approx(1 / (0.25 + 0.0625 + 0.0625))
    assert hill(np.zeros(3)) == {"q0": 0.0, "q1": 0.0, "q2": 0.0}


def test_truth_matches_the_events_day_by_day():
    data, truth = small(3)
    start = truth["daily"][0]["start_ns"]
    assert start % DAY_NS == 0 and (np.diff(data["t0_ns"]) >= 0).all()  # UTC midnight, events in time order
    day = (data["t0_ns"] - start) // DAY_NS
    assert day.min() >= 0 and day.max() < truth["days"]
    for d, w in enumerate(truth["daily"]):
        counted = Counter(data["label"][day == d].tolist())
        assert counted == Counter(w["abundance"])
        assert w["hill"] == pytest.approx(hill(np.array(list(counted.values()))))
        assert w["events"] == (day == d).sum()
    assert sum(w["events"] for w in truth["daily"]) == len(data["label"]) == 240
    assert Counter(data["label"].tolist()) == Counter(truth["overall"]["abundance"])


def test_species_table_varies_by_seed():
    tables = [small(s, days=1, events=20)[1]["species"] for s in range(6)]
    assert len({len(t) for t in tables}) > 1  # the number of species is drawn
    f0 = [sorted(round(sp["f_wing"]) for sp in t) for t in tables]
    assert len({tuple(f) for f in f0}) == 6
    for t in tables:  # fundamentals spaced as asked
        logs = np.log(sorted(sp["f_wing"] for sp in t))
        assert np.diff(logs).min() >= COMMUNITIES["changing"].min_spacing - 1e-12
    again = small(2, days=1, events=20)
    assert again[1] == small(2, days=1, events=20)[1]
    assert np.array_equal(again[0]["samples"], small(2, days=1, events=20)[0]["samples"])


def test_species_appear_and_vanish_only_on_their_days():
    com = Community(species=6, turnover=1.0, sigma_day=0.0, sigma_base=0.0)
    data, truth = small(5, days=5, events=600, com=com)
    day = (data["t0_ns"] - truth["daily"][0]["start_ns"]) // DAY_NS
    partial = [sp for sp in truth["species"] if len(sp["present_days"]) < 5]
    assert len(partial) >= 4  # all but the most abundant may come and go
    for sp in truth["species"]:
        flew = set(day[data["label"] == sp["name"]].tolist())
        assert flew <= set(sp["present_days"])
    assert len({w["hill"]["q0"] for w in truth["daily"]}) > 1  # richness changes by day


def test_diel_activity_peaks_at_each_species_hour():
    com = Community(species=3, width_min=0.5, width_max=0.5, turnover=0.0, sigma_base=0.0)
    data, truth = small(7, days=2, events=600, com=com)
    hour = ((data["t0_ns"] - truth["daily"][0]["start_ns"]) % DAY_NS) / 3.6e12
    for sp in truth["species"]:
        ang = hour[data["label"] == sp["name"]] * 2 * np.pi / 24
        mean = np.angle(np.exp(1j * ang).mean()) * 24 / (2 * np.pi) % 24
        gap = abs((mean - sp["peak_hour"] + 12) % 24 - 12)
        assert gap < 0.3, (sp["name"], mean, sp["peak_hour"])


def test_noise_and_wavelengths_are_instrument_settings():
    one = simulate_deployment(SimConfig(events=30, seed=1, channels=1, fs=9600.0, noise=0.0), 1, COMMUNITIES["stable"])
    assert set(one[0]["channels"].tolist()) == {1} and set(one[0]["fs"].tolist()) == {9600.0}
    assert one[1]["instrument"] == {"fs": 9600.0, "channels": 1, "noise": 0.0}
    with pytest.raises(ValueError, match="noise"):
        SimConfig(noise=-1.0)
    # the plain stream is unaffected by the deployment machinery: same seed, same events
    a, b = simulate(SimConfig(events=20, seed=4)), simulate(SimConfig(events=20, seed=4))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_community_presets_and_json():
    assert community_from("stable") == COMMUNITIES["stable"]
    c = community_from('{"preset": "volatile", "species": 8, "turnover": 0.1}')
    assert (c.species, c.turnover, c.sigma_day) == (8, 0.1, COMMUNITIES["volatile"].sigma_day)
    for bad, what in (("nope", "must be one of"), ('{"colour": 1}', "unknown fields"), ("[1]", "object"),
                      ('{"turnover": 2}', "turnover"), ('{"species": "x"}', "wrong type")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            community_from(bad)


def test_cli_writes_a_deployment_and_its_truth(tmp_path):
    out = tmp_path / "dep.npz"
    r = cli("simulate", "--out", str(out), "--days", "3", "--events", "150", "--seed", "9", "--labelled-fraction",
            "0", "--community", '{"preset": "stable", "species": 4}', "--channels", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    truth = json.loads((tmp_path / "dep.truth.json").read_text())
    assert "3 days" in r.stdout and str(tmp_path / "dep.truth.json") in r.stdout
    rec = read_recordings(out)
    assert len(rec) == truth["overall"]["events"] == 150 and len(truth["species"]) == 4
    assert (rec.label == "").all() and set(rec.channels.tolist()) == {1}
    assert rec.t0_ns[0] >= truth["daily"][0]["start_ns"] and rec.t0_ns[-1] < truth["daily"][-1]["end_ns"]
    bad = cli("simulate", "--out", str(tmp_path / "x.npz"), "--days", "2", "--community", "meadow")
    assert bad.returncode == 2 and "meadow" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()
