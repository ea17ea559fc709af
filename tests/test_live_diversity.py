"""The live diversity state (daemon.serve.live_diversity) with known answers: counts in, gauges and summaries out;
buckets leaving the windows after 1 h and 24 h; a new version dropping the clusters it does not have. The daemon
end of it (gauges scraped by a real Prometheus, summaries on a real XPUB) is in test_prometheus.py."""

from __future__ import annotations

import math

import pytest

from daemon.ops.config import ConfigError, Diversity, from_dict
from daemon.ops.metrics import Metrics
from daemon.serve.live_diversity import LiveDiversity

T0 = 1_780_000_000.0 - 1_780_000_000.0 % 86400 + 3600 * 5 + 10  # 05:00:10 UTC on some day


def gauge(m: Metrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


def live(every: int = 3600, day: bool = True) -> tuple[LiveDiversity, Metrics]:
    m = Metrics()
    d = LiveDiversity(Diversity(summary_every_s=every, summary_day=day), m, station="")
    d.serving([0, 1, 2])
    return d, m


def test_gauges_are_the_observed_hill_numbers_of_the_window():
    d, m = live()
    d.add({0: 2, 1: 2}, {1}, T0)
    d.add({0: 0, 2: 0, -1: 3}, {1}, T0 + 1)  # zeros and novel events: no cluster more, novel counted apart
    assert d.refresh(T0 + 2) == []
    for w in ("1h", "24h"):
        assert gauge(m, "wingbeat_diversity", q="0", window=w) == 2
        assert gauge(m, "wingbeat_diversity", q="1", window=w) == pytest.approx(2.0)  # two equal clusters
        assert gauge(m, "wingbeat_diversity", q="2", window=w) == pytest.approx(2.0)
        assert gauge(m, "wingbeat_cluster_abundance", cluster="0", window=w) == 2
        assert gauge(m, "wingbeat_cluster_abundance", cluster="2", window=w) == 0
        assert gauge(m, "wingbeat_diversity_novel_events", window=w) == 3
        assert gauge(m, "wingbeat_sample_coverage", window=w) == pytest.approx(1.0)  # no singletons
    assert m.registry.get_sample_value("wingbeat_cluster_abundance", {"cluster": "-1", "window": "1h"}) is None
    # 3 of cluster 0 and 1 of cluster 1: q1 = exp(−¾ ln ¾ − ¼ ln ¼), q2 = 1/(9/16 + 1/16), Ĉ = 1 − (1/4)·A
    d.add({0: 1, 1: -1}, {1}, T0 + 3)
    d.refresh(T0 + 4)
    q1 = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert gauge(m, "wingbeat_diversity", q="1", window="1h") == pytest.approx(q1)
    assert gauge(m, "wingbeat_diversity", q="2", window="1h") == pytest.approx(1.6)
    # f1 = 1, f2 = 0: f̂0 = (n−1)/n · f1(f1−1)/2 = 0, so A = 0 and Ĉ = 1; Chao1 = S_obs
    assert gauge(m, "wingbeat_sample_coverage", window="1h") == pytest.approx(1.0)
    assert gauge(m, "wingbeat_diversity_estimated", q="0", window="1h") == pytest.approx(2.0)


def test_an_empty_window_reads_zero_and_coverage_nan():
    d, m = live()
    d.refresh(T0)
    assert gauge(m, "wingbeat_diversity", q="0", window="24h") == 0
    assert math.isnan(gauge(m, "wingbeat_sample_coverage", window="24h"))


def test_buckets_leave_the_hour_after_an_hour_and_the_day_after_a_day():
    d, m = live()
    d.add({0: 5}, {1}, T0)
    d.add({1: 7}, {1}, T0 + 1800)
    d.refresh(T0 + 3500)  # both inside the last 60 minutes still (05:00 to 05:58)
    assert gauge(m, "wingbeat_diversity", q="0", window="1h") == 2
    d.refresh(T0 + 3600 + 60)  # 06:01: the minute of 05:00 left the hour, not the day
    assert gauge(m, "wingbeat_cluster_abundance", cluster="0", window="1h") == 0
    assert gauge(m, "wingbeat_cluster_abundance", cluster="0", window="24h") == 5
    assert gauge(m, "wingbeat_diversity", q="0", window="1h") == 1
    d.refresh(T0 + 86400 + 60)
    assert gauge(m, "wingbeat_cluster_abundance", cluster="0", window="24h") == 0
    assert gauge(m, "wingbeat_cluster_abundance", cluster="1", window="24h") == 7
    d.refresh(T0 + 86400 + 1800 + 60)
    assert gauge(m, "wingbeat_diversity", q="0", window="24h") == 0
    assert all(not r.buckets and not r.total for r in d.rolling.values())  # bounded: nothing left


def test_memory_is_bounded_by_minutes_not_events():
    d, _ = live()
    times = [T0 + 20 * i for i in range(3 * 86400 // 20)]  # three days, a batch of 10 every 20 s
    for i, t in enumerate(times):
        d.add({i % 3: 10}, {1}, t)
    now = T0 + 3 * 86400
    d.refresh(now)
    # one bucket a minute that had a batch: every minute of the window but the current one (no batch yet)
    assert len(d.rolling["24h"].buckets) == 1439 and len(d.rolling["1h"].buckets) == 59
    for w, minutes in (("24h", 1440), ("1h", 60)):  # the batches of the last `minutes` minutes, this one included
        inside = [t for t in times if t // 60 > now // 60 - minutes]
        assert sum(d.rolling[w].total.values()) == 10 * len(inside) and len(inside) >= 3 * (minutes - 1)


def test_a_new_version_drops_stale_clusters_and_counts_new_ones():
    d, m = live()
    d.add({0: 4, 1: 4, 2: 4, -1: 1}, {1}, T0)
    d.refresh(T0 + 1)
    assert gauge(m, "wingbeat_model_new_clusters_total") == 0  # the first version's clusters are not "new"
    d.serving([0, 1, 5])  # cluster 2 gone, 5 new
    d.refresh(T0 + 2)
    for w in ("1h", "24h"):
        assert m.registry.get_sample_value("wingbeat_cluster_abundance", {"cluster": "2", "window": w}) is None
        assert gauge(m, "wingbeat_cluster_abundance", cluster="5", window=w) == 0
        assert gauge(m, "wingbeat_diversity", q="0", window=w) == 2
        assert gauge(m, "wingbeat_diversity_novel_events", window=w) == 1
    assert gauge(m, "wingbeat_model_new_clusters_total") == 1
    d.add({2: 9, 5: 1}, {1}, T0 + 3)  # an older version's output published late: not in the gauges
    d.refresh(T0 + 4)
    assert gauge(m, "wingbeat_diversity", q="0", window="1h") == 3
    d.serving([0, 1, 5])  # the same clusters again: nothing new
    d.serving([0, 1, 2, 5])  # 2 served before in this process: not new either
    assert gauge(m, "wingbeat_model_new_clusters_total") == 1


def test_a_summary_goes_out_when_the_hour_and_the_day_close():
    d, _ = live()
    day0 = T0 - T0 % 86400
    d.add({0: 3, 1: 1, -1: 2}, {1}, day0 + 23 * 3600 + 5)
    d.add({1: 2}, {2}, day0 + 23 * 3600 + 60)
    assert d.refresh(day0 + 23 * 3600 + 3599) == []  # still open
    out = d.refresh(day0 + 86400 + 1)
    assert [s["window_s"] for s in out] == [3600, 86400]
    hour = out[0]
    assert hour["start"] == "2026-05-28T23:00:00+00:00" and hour["end"] == "2026-05-29T00:00:00+00:00"
    assert (hour["station"], hour["events"], hour["novel"], hour["pending"]) == ("", 8, 2, 0)
    assert hour["abundance"] == {"0": 3, "1": 3} and hour["model_version"] == [1, 2]
    assert hour["observed"] == {"q0": 2.0, "q1": pytest.approx(2.0), "q2": pytest.approx(2.0)}
    assert set(hour) >= {"estimated", "ci95", "coverage"} and hour["ci95"]["q0"][0] <= 2 <= hour["ci95"]["q0"][1]
    assert out[1]["start"] == "2026-05-28T00:00:00+00:00" and out[1]["abundance"] == hour["abundance"]
    assert d.refresh(day0 + 86400 + 7200) == []  # a window without events sends nothing


def test_a_short_summary_period_and_no_day():
    d, _ = live(every=2, day=False)
    d.add({0: 1}, {1}, T0 + 0.5)
    d.add({0: 1}, {1}, T0 + 1.5)
    d.add({1: 1}, {1}, T0 + 2.5)  # windows of 2 s aligned to the epoch: T0 is even, so this one is the next
    out = d.refresh(T0 + 4.1)
    assert [(s["window_s"], s["abundance"]) for s in out] == [(2, {"0": 2}), (2, {"1": 1})]
    assert sum(s["events"] for s in out) == 3


def test_the_summary_period_is_validated():
    assert from_dict({"diversity": {"summary_every_s": 900}}).diversity.summary_every_s == 900
    for bad in (0, 7, 100_000):
        with pytest.raises(ConfigError, match=r"diversity.summary_every_s: must be ≥ 1 and divide 86400"):
            from_dict({"diversity": {"summary_every_s": bad}})
