"""Rarefaction and extrapolation by size and by coverage, against iNEXT 3.0.2 and hand-worked samples."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats

from model import diversity as dv
from model.rarefaction import _brent_fmin

CASES = ["spider_girdled", "spider_logged", "small_f1_3_f2_1", "no_singletons", "no_doubletons", "uneven_day", "even_8"]


@pytest.fixture(scope="module")
def inext(data_dir: Path) -> dict[str, Any]:
    return json.loads((data_dir / "inext_reference.json").read_text())["cases"]


@pytest.mark.parametrize("case", CASES)
def test_size_based_matches_inext(inext: dict[str, Any], case: str) -> None:
    ref = inext[case]
    rows = list(ref["size_based"].values())
    assert sorted({r["m"] for r in rows}) == [ref["n"] // 2, ref["n"], 2 * ref["n"]]
    for r in rows:
        assert dv.hill_at_size(ref["counts"], r["m"], r["Order.q"]) == pytest.approx(r["qD"], rel=1e-6)
        assert dv.coverage_at_size(ref["counts"], r["m"]) == pytest.approx(r["SC"], rel=1e-6)
    curve = dv.rarefaction_curve(ref["counts"], [r["m"] for r in rows])
    for r, point in zip(rows, curve, strict=True):
        assert point["method"] == r["Method"].lower()
        assert point[f"q{r['Order.q']}"] == pytest.approx(r["qD"], rel=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_coverage_based_matches_inext(inext: dict[str, Any], case: str) -> None:
    ref = inext[case]
    rows = list(ref["coverage_based"].values())
    for r in rows:
        goal = round(r["SC"], 2)  # the asked coverage: 0.8, 0.9 or 0.95 (iNEXT reports the coverage reached)
        assert goal in (0.8, 0.9, 0.95)
        m = dv.size_for_coverage(ref["counts"], goal)
        assert m == pytest.approx(r["m"], rel=1e-6)
        assert dv.coverage_at_size(ref["counts"], m) == pytest.approx(r["SC"], rel=1e-6)
        assert dv.hill_at_coverage(ref["counts"], goal, r["Order.q"]) == pytest.approx(r["qD"], rel=1e-6)


def test_hand_worked_rarefaction_of_two_doubletons() -> None:
    # [2, 2]: two individuals drawn without replacement are of one species with probability 2/C(4, 2) = 1/3.
    x = [2, 2]
    assert dv.hill_at_size(x, 2, 0) == pytest.approx(1 / 3 * 1 + 2 / 3 * 2)
    assert dv.hill_at_size(x, 2, 1) == pytest.approx(math.exp(2 / 3 * math.log(2)))
    assert dv.hill_at_size(x, 2, 2) == pytest.approx(1 / (1 / 3 * 1 + 2 / 3 * 0.5))
    assert dv.hill_at_size(x, 1, 0) == pytest.approx(1.0)
    # Coverage of one individual: the other three hold 1 of its kind → Ĉ(1) = 1 − Σ (xᵢ/n)·C(n−xᵢ, 1)/C(n−1, 1).
    assert dv.coverage_at_size(x, 1) == pytest.approx(1 - 2 * 0.5 * 2 / 3)
    # Fractional sizes interpolate linearly between the integers on either side, as iNEXT does.
    mid = dv.hill_at_size(x, 1.25, 0)
    assert mid == pytest.approx(0.75 * dv.hill_at_size(x, 1, 0) + 0.25 * dv.hill_at_size(x, 2, 0))


def test_hand_worked_extrapolation() -> None:
    # No singletons: nothing is missing, richness stays 2 and coverage 1; q2 follows 1/(1/m + (1 − 1/m)·1/3).
    assert dv.hill_at_size([2, 2], 8, 0) == pytest.approx(2.0)
    assert dv.hill_at_size([2, 2], 8, 2) == pytest.approx(1 / (1 / 8 + 7 / 8 / 3))
    assert dv.coverage_at_size([2, 2], 8) == 1.0
    # [1, 1]: f̂0 = 1/2 and Chao et al. (2014): S(n + m*) = S + f̂0·(1 − (1 − f1/(n f̂0 + f1))^m*).
    assert dv.hill_at_size([1, 1], 4, 0) == pytest.approx(2 + 0.5 * (1 - (1 - 2 / 3) ** 2))
    # Ĉ(n + m*) = 1 − (f1/n)·A^(m*+1) with A = 1/3.
    assert dv.coverage_at_size([1, 1], 3) == pytest.approx(1 - (1 / 3) ** 2)
    assert dv.coverage_at_size([1, 1], 1) == 0.0  # one individual covers nothing of a two-singleton sample


def test_the_curve_meets_the_sample_at_n() -> None:
    x = [10, 5, 3, 2, 1, 1, 1]
    obs = dv.observed(x)
    for q in (0, 1, 2):
        assert dv.hill_at_size(x, 23, q) == pytest.approx(obs[f"q{q}"])
        # Continuous across n: one individual either side stays close to the sample.
        assert dv.hill_at_size(x, 22, q) < obs[f"q{q}"] < dv.hill_at_size(x, 24, q)
    assert dv.coverage_at_size(x, 23) == pytest.approx(dv.sample_coverage(x))
    est = dv.estimated(x)
    assert dv.hill_at_size(x, 1e7, 0) == pytest.approx(est["q0"], rel=1e-6)  # extrapolation tends to Chao1


def test_curve_rows() -> None:
    x = [10, 5, 3, 2, 1, 1, 1]
    rows = dv.rarefaction_curve(x, [1, 11.5, 23, 46])
    assert [r["method"] for r in rows] == ["rarefaction", "rarefaction", "observed", "extrapolation"]
    assert [r["m"] for r in rows] == [1.0, 11.5, 23.0, 46.0]
    assert rows[0]["q0"] == pytest.approx(1.0)
    for r in rows:
        assert set(r) == {"m", "method", "coverage", "q0", "q1", "q2"}
        assert r["coverage"] == pytest.approx(dv.coverage_at_size(x, r["m"]))
        assert r["q1"] == pytest.approx(dv.hill_at_size(x, r["m"], 1))
    coverages = [r["coverage"] for r in rows]
    assert coverages == sorted(coverages)


@pytest.mark.parametrize("goal", [0.5, 0.8, 0.95, 0.99])
def test_size_for_coverage_inverts_coverage(goal: float) -> None:
    x = [46, 22, 17, 15, 15, 9, 8, 6, 6, 4, 2, 2, 2, 2] + [1] * 12
    m = dv.size_for_coverage(x, goal)
    # Below the sample's coverage iNEXT's search stops within ~1e-4 individuals; above it the solution is exact.
    assert dv.coverage_at_size(x, m) == pytest.approx(goal, abs=1e-5)
    assert (m < sum(x)) == (goal < dv.sample_coverage(x))


def test_small_and_large_windows_compare_at_common_coverage() -> None:
    # Same community, sampled 10× more: raw richness differs, coverage-standardised richness much less so.
    small = [8, 4, 3, 2, 2, 1, 1, 1]
    large = [80, 40, 30, 20, 20, 10, 10, 10, 2, 1, 1]
    raw = dv.observed(large)["q0"] / dv.observed(small)["q0"]
    std = dv.hill_at_coverage(large, 0.85, 0) / dv.hill_at_coverage(small, 0.85, 0)
    assert abs(std - 1) < abs(raw - 1)


@pytest.mark.parametrize("counts", [[], [0, 0]])
def test_empty_sample(counts: list[int]) -> None:
    assert dv.coverage_at_size(counts, 5) == 0.0
    assert dv.hill_at_size(counts, 5, 1) == 0.0
    assert dv.size_for_coverage(counts, 0.9) == 0.0
    assert dv.hill_at_coverage(counts, 0.9, 2) == 0.0
    assert dv.rarefaction_curve(counts, [1, 2])[0]["method"] == "extrapolation"


@pytest.mark.parametrize("counts", [[1], [5], [1, 1], [1] * 30, [3, 1, 1], [2]])
def test_edge_samples_do_not_fail(counts: list[int]) -> None:
    n = sum(counts)
    for goal in (0.5, 0.9, 0.99):
        m = dv.size_for_coverage(counts, goal)
        assert m >= 1
        for q in (0, 1, 2):
            assert math.isfinite(dv.hill_at_coverage(counts, goal, q))
    for row in dv.rarefaction_curve(counts, [1, n, 2 * n + 1]):
        assert all(math.isfinite(row[k]) for k in ("coverage", "q0", "q1", "q2"))


def test_unreachable_full_coverage() -> None:
    x = [10, 5, 3, 2, 1, 1, 1]
    assert dv.size_for_coverage(x, 1.0) == math.inf
    assert dv.hill_at_coverage(x, 1.0, 0) == pytest.approx(dv.estimated(x)["q0"])  # the asymptote
    assert dv.size_for_coverage([2, 2], 1.0) == 4  # already complete


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"got 0\.5"):
        dv.hill_at_size([3, 1], 0.5, 0)
    with pytest.raises(ValueError, match="nan"):
        dv.coverage_at_size([3, 1], float("nan"))
    with pytest.raises(ValueError, match="order q"):
        dv.hill_at_size([3, 1], 2, 3)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="coverage C"):
            dv.size_for_coverage([3, 1], bad)
    with pytest.raises(ValueError, match="-2"):
        dv.hill_at_coverage([3, -2], 0.9, 0)


def test_brent_port_finds_a_minimum() -> None:
    tol = 2.220446049250313e-16**0.25
    assert _brent_fmin(lambda v: (v - 2.0) ** 2, 0.0, 5.0, tol) == pytest.approx(2.0, abs=tol)
    assert _brent_fmin(lambda v: abs(v - 0.3), 0.0, 1.0, tol) == pytest.approx(0.3, abs=tol)


@pytest.mark.parametrize("m", [7, 900, 1999])
def test_rarefaction_is_the_hypergeometric_expectation(m: int) -> None:
    # Independent of iNEXT's code: E[Σ g(Yᵢ)] with Yᵢ ~ Hypergeometric(n, xᵢ, m), by scipy.stats over all k.
    rng = np.random.default_rng(9)
    x = rng.multinomial(2000, rng.dirichlet(np.full(60, 0.5)))
    k = np.arange(1, m + 1)
    pmf = np.array([scipy.stats.hypergeom.pmf(k, 2000, xi, m) for xi in x if xi > 0])  # (species, k)
    share = k / m
    want = [pmf.sum(), math.exp(float(np.sum(-share * np.log(share) * pmf))), 1 / float(np.sum(share**2 * pmf))]
    got = [dv.hill_at_size(x, m, q) for q in (0, 1, 2)]
    assert got == pytest.approx(want, rel=1e-9)
