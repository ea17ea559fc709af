"""Alpha diversity of one sample: observed and asymptotic Hill numbers, coverage, bootstrap intervals, Summary.

Known answers: iNEXT 3.0.2's outputs (``data/inext_reference.json``) and small samples worked by hand below.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from skbio.diversity import alpha as skbio_alpha

from model import diversity as dv
from model.hill import estimate_rows

CASES = ["spider_girdled", "spider_logged", "small_f1_3_f2_1", "no_singletons", "no_doubletons", "uneven_day", "even_8"]


@pytest.fixture(scope="module")
def inext(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "inext_reference.json").read_text())["cases"]


def test_reference_holds_the_cases_tested(inext: dict[str, Any]) -> None:
    assert sorted(inext) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_observed_and_estimated_match_inext(inext: dict[str, Any], case: str) -> None:
    ref = inext[case]
    obs, est = dv.observed(ref["counts"]), dv.estimated(ref["counts"])
    for row, q in zip(("1", "2", "3"), dv.Q, strict=True):
        assert obs[q] == pytest.approx(ref["asymptotic"][row]["Observed"], rel=1e-6)
        assert est[q] == pytest.approx(ref["asymptotic"][row]["Estimator"], rel=1e-6)
    assert obs["q0"] == ref["S_obs"]


@pytest.mark.parametrize("case", CASES)
def test_sample_coverage_matches_inext(inext: dict[str, Any], case: str) -> None:
    # iNEXT prints DataInfo's SC to 4 decimals.
    assert dv.sample_coverage(inext[case]["counts"]) == pytest.approx(inext[case]["coverage"], abs=5.1e-5)


@pytest.mark.parametrize("case", ["spider_girdled", "spider_logged"])
def test_bootstrap_se_is_of_inexts_size(inext: dict[str, Any], case: str) -> None:
    # iNEXT's s.e. comes from its own 100 random replicates, so only the size can agree.
    ci = dv.bootstrap_ci(inext[case]["counts"], n_boot=1000, seed=3)
    est = dv.estimated(inext[case]["counts"])
    z = 1.959963984540054
    for row, q in (("2", "q1"), ("3", "q2")):
        se = (ci[q][1] - est[q]) / z
        assert 0.6 < se / inext[case]["asymptotic"][row]["Est_s.e."] < 1.6


def test_hand_worked_two_singletons() -> None:
    # [1, 1]: n = 2, f1 = 2, f2 = 0 → f̂0 = (1/2)·2·1/2 = 1/2; A = n f̂0/(n f̂0 + f1) = 1/3 → Ĉ = 1 − 1·1/3.
    # q1: Σ (xᵢ/n)(ψ(2) − ψ(1)) = 1; D1 term with A' = 2/((n−1)(f1−1)+2) = 2/3: (f1/n)(1/3)^(−1)(ln(3/2) − 1/3)
    # = 3 ln(3/2) − 1, so q1 = exp(3 ln 1.5) = 3.375. q2: no species seen twice → unbounded.
    assert dv.observed([1, 1]) == pytest.approx({"q0": 2.0, "q1": 2.0, "q2": 2.0})
    est = dv.estimated([1, 1])
    assert est["q0"] == pytest.approx(2.5)
    assert est["q1"] == pytest.approx(3.375, rel=1e-9)
    assert est["q2"] == math.inf
    assert dv.sample_coverage([1, 1]) == pytest.approx(2 / 3)


def test_hand_worked_two_doubletons() -> None:
    # [2, 2]: n = 4, no singletons → richness complete, Ĉ = 1; q1 = exp(ψ(4) − ψ(2)) = exp(1/2 + 1/3);
    # q2 = n(n − 1)/Σ xᵢ(xᵢ − 1) = 12/4.
    assert dv.estimated([2, 2]) == pytest.approx({"q0": 2.0, "q1": math.exp(5 / 6), "q2": 3.0})
    assert dv.sample_coverage([2, 2]) == 1.0


def test_hand_worked_single_species() -> None:
    for fig in (dv.observed([5]), dv.estimated([5])):
        assert fig == pytest.approx({"q0": 1.0, "q1": 1.0, "q2": 1.0})
    assert dv.sample_coverage([5]) == 1.0


def test_hand_worked_three_one_one() -> None:
    # [3, 1, 1]: n = 5, f1 = 2, f2 = 0. f̂0 = (4/5)·2·1/2 = 4/5; A = 5·0.8/(4 + 2) = 2/3 → Ĉ = 1 − (2/5)(2/3).
    p = np.array([0.6, 0.2, 0.2])
    assert dv.observed([3, 1, 1]) == pytest.approx(
        {"q0": 3.0, "q1": math.exp(-float(np.sum(p * np.log(p)))), "q2": 1 / 0.44}
    )
    head = 3 / 5 * (1 / 3 + 1 / 4) + 2 * (1 / 5) * (1 + 1 / 2 + 1 / 3 + 1 / 4)  # Σ (xᵢ/n)(ψ(5) − ψ(xᵢ))
    y = 1 - 2 / (4 * 1 + 2)  # 1 − A' with A' = 2/((n − 1)(f1 − 1) + 2) = 1/3
    bracket = -math.log(1 / 3) - sum(y**r / r for r in range(1, 5))
    tail = 2 / 5 * y ** (1 - 5) * round(bracket * 1e12) / 1e12
    est = dv.estimated([3, 1, 1])
    assert est == pytest.approx({"q0": 3.8, "q1": math.exp(head + tail), "q2": 20 / 6}, rel=1e-12)
    assert dv.sample_coverage([3, 1, 1]) == pytest.approx(11 / 15)


def test_zeros_are_ignored() -> None:
    assert dv.estimated([0, 3, 0, 1, 1, 0]) == dv.estimated([3, 1, 1])
    assert dv.observed(np.array([0.0, 3.0, 1.0, 1.0])) == dv.observed([3, 1, 1])


def test_observed_agrees_with_scikit_bio() -> None:
    x = np.random.default_rng(4).multinomial(500, np.random.default_rng(5).dirichlet(np.full(40, 0.4)))
    obs = dv.observed(x)
    for q in (0, 1, 2):
        assert obs[f"q{q}"] == pytest.approx(skbio_alpha.hill(x, order=q), rel=1e-12)
    assert dv.estimated(x)["q2"] == pytest.approx(skbio_alpha.inv_simpson(x, finite=True), rel=1e-12)


def test_vectorised_estimator_equals_the_single_one() -> None:
    rng = np.random.default_rng(6)
    rows = rng.multinomial(300, rng.dirichlet(np.full(60, 0.3)), size=40)
    got = estimate_rows(rows)
    for row, (q0, q1, q2) in zip(rows, got, strict=True):
        est = dv.estimated(row)
        assert (q0, q1) == pytest.approx((est["q0"], est["q1"]), rel=1e-12)
        assert q2 == pytest.approx(est["q2"], rel=1e-12) or (math.isinf(q2) and math.isinf(est["q2"]))


@pytest.mark.parametrize("counts", [[], [0, 0, 0], np.zeros(0, dtype=np.int64)])
def test_empty_sample_is_all_zero(counts: Any) -> None:
    s = dv.summarise(counts)
    assert s.n == 0
    assert s.to_dict() == {
        "observed": {"q0": 0.0, "q1": 0.0, "q2": 0.0},
        "estimated": {"q0": 0.0, "q1": 0.0, "q2": 0.0},
        "ci95": {"q0": [0.0, 0.0], "q1": [0.0, 0.0], "q2": [0.0, 0.0]},
        "coverage": 0.0,
    }


@pytest.mark.parametrize("counts", [[1], [1] * 30, [1, 1], [7], [2], [4, 0, 0]])
def test_edge_samples_summarise_to_strict_json(counts: list[int]) -> None:
    s = dv.summarise(counts, n_boot=50)
    text = json.dumps(s.to_dict(), allow_nan=False)  # no NaN or Infinity may leak into the JSON
    back = json.loads(text)
    assert back["observed"]["q0"] == len([c for c in counts if c > 0])
    for q in dv.Q:
        lo, hi = s.ci95[q]
        assert 0 <= lo <= s.estimated[q] <= hi
        assert s.observed[q] <= s.estimated[q]


def test_all_singletons_have_unbounded_q2_written_as_null() -> None:
    s = dv.summarise([1] * 30, n_boot=50)
    assert s.estimated["q2"] == math.inf
    assert s.to_dict()["estimated"]["q2"] is None
    assert s.to_dict()["ci95"]["q2"] == [30.0, None]
    assert s.estimated["q0"] == pytest.approx(30 + 29 / 30 * 30 * 29 / 2)  # f2 = 0: f1(f1 − 1)/2 branch


@pytest.mark.parametrize(
    ("counts", "named"),
    [([3, -1, 2], "-1"), ([1.0, float("nan")], "nan"), ([2.5, 1], "2.5"), ([1, float("inf")], "inf")],
)
def test_bad_counts_are_rejected_naming_the_value(counts: list[float], named: str) -> None:
    for fn in (dv.observed, dv.estimated, dv.sample_coverage, dv.summarise):
        with pytest.raises(ValueError, match=re.escape(f"got {named} at index")):
            fn(counts)


def test_non_vector_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        dv.observed([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="numbers"):
        dv.observed(["a", "b"])


def test_bootstrap_is_seeded() -> None:
    x = [46, 22, 17, 15, 15, 9, 8, 6, 6, 4, 2, 2, 2, 2] + [1] * 12
    assert dv.bootstrap_ci(x, seed=11) == dv.bootstrap_ci(x, seed=11)
    assert dv.bootstrap_ci(x, seed=11) != dv.bootstrap_ci(x, seed=12)
    assert dv.summarise(x, seed=11) == dv.summarise(x, seed=11)


def test_intervals_cover_the_estimate_and_widen_with_level() -> None:
    x = [46, 22, 17, 15, 15, 9, 8, 6, 6, 4, 2, 2, 2, 2] + [1] * 12
    est, obs = dv.estimated(x), dv.observed(x)
    narrow, wide = dv.bootstrap_ci(x, level=0.8, seed=1), dv.bootstrap_ci(x, level=0.95, seed=1)
    for q in dv.Q:
        assert wide[q][0] <= narrow[q][0] <= est[q] <= narrow[q][1] < wide[q][1]
    assert wide["q0"][0] >= obs["q0"]  # iNEXT's rule: richness is at least what was seen
    # Symmetric about the estimate except where clipped: estimate ± z·s.e.
    assert wide["q1"][1] - est["q1"] == pytest.approx(est["q1"] - wide["q1"][0])


def test_bootstrap_community_adds_the_undetected() -> None:
    x = [10, 5, 3, 2, 1, 1, 1]  # f1 = 3, f2 = 1, n = 23: f̂0 = (22/23)·9/2 = 4.30 → 5 undetected species
    p = dv.bootstrap_community(x)
    assert p.size == 7 + 5
    assert p.sum() == pytest.approx(1.0)
    assert np.all(np.diff(p) <= 0)
    f0 = 22 / 23 * 9 / 2
    missing = 3 / 23 * (23 * f0 / (23 * f0 + 3))  # (f1/n)·A = 1 − Ĉ, shared by the undetected
    assert np.count_nonzero(np.isclose(p, missing / 5, rtol=1e-12)) == 5
    # Without singletons the community is the sample itself.
    assert dv.bootstrap_community([8, 4, 2, 2]) == pytest.approx(np.array([8, 4, 2, 2]) / 16)


def test_bad_bootstrap_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_boot"):
        dv.bootstrap_ci([3, 1], n_boot=1)
    with pytest.raises(ValueError, match="level"):
        dv.bootstrap_ci([3, 1], level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        dv.summarise([3, 1], n_boot=0)


def test_summary_fields_and_json_shape() -> None:
    x = [10, 5, 3, 2, 1, 1, 1]
    s = dv.summarise(x, seed=2, n_boot=100)
    assert s.n == 23
    assert s.observed == dv.observed(x)
    assert s.estimated == dv.estimated(x)
    assert s.ci95 == dv.bootstrap_ci(x, n_boot=100, seed=2)
    assert s.coverage == dv.sample_coverage(x)
    d = s.to_dict()
    assert set(d) == {"observed", "estimated", "ci95", "coverage"}
    assert d["ci95"]["q1"] == list(s.ci95["q1"])
    with pytest.raises(AttributeError):
        s.n = 3  # type: ignore[misc]
