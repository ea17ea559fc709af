"""Between sites or windows: Jost's multiplicative beta and the Bray–Curtis and Sørensen dissimilarities."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skbio.diversity import beta_diversity

from model import diversity as dv


@pytest.mark.parametrize("q", [0, 1, 2])
def test_identical_sites_have_beta_one(q: int) -> None:
    site = [10, 5, 3, 0, 1]
    b = dv.beta_multiplicative([site, site, site], q=q)
    assert b["beta"] == pytest.approx(1.0)
    assert b["gamma"] == pytest.approx(b["alpha"])
    # Equal weights: sites with the same proportions but different totals are the same community.
    assert dv.beta_multiplicative([site, np.array(site) * 7], q=q)["beta"] == pytest.approx(1.0)


@pytest.mark.parametrize("q", [0, 1, 2])
def test_disjoint_equal_sites_have_beta_equal_to_their_number(q: int) -> None:
    table = np.zeros((3, 9), dtype=int)
    for i in range(3):
        table[i, 3 * i : 3 * i + 3] = [6, 3, 1]
    b = dv.beta_multiplicative(table, q=q)
    assert b["beta"] == pytest.approx(3.0)
    assert b["alpha"] == pytest.approx(dv.observed([6, 3, 1])[f"q{q}"])


def test_hand_worked_half_overlap() -> None:
    # Sites {a, b} and {b, c}, each even: pooled p = (1/4, 1/2, 1/4), each site's alpha = 2.
    table = [[1, 1, 0], [0, 1, 1]]
    assert dv.beta_multiplicative(table, q=0) == pytest.approx({"gamma": 3.0, "alpha": 2.0, "beta": 1.5})
    assert dv.beta_multiplicative(table, q=1) == pytest.approx(
        {"gamma": 2**1.5, "alpha": 2.0, "beta": math.sqrt(2)}  # exp(−(2·¼ln¼ + ½ln½)) = 2^1.5
    )
    assert dv.beta_multiplicative(table, q=2) == pytest.approx({"gamma": 8 / 3, "alpha": 2.0, "beta": 4 / 3})


def test_beta_alpha_is_jost_mean_not_mean_of_hill_numbers() -> None:
    # q = 2: alpha = 1/mean(Σp²) — for sites with Σp² = 1 and 1/4 that is 1/0.625 = 1.6, not mean(1, 4) = 2.5.
    table = [[5, 0, 0, 0, 0], [0, 1, 1, 1, 1]]
    assert dv.beta_multiplicative(table, q=2)["alpha"] == pytest.approx(1.6)
    # q = 1: alpha = exp(mean Shannon) = exp((0 + ln 4)/2) = 2.
    assert dv.beta_multiplicative(table, q=1)["alpha"] == pytest.approx(2.0)


def test_beta_leaves_out_empty_sites() -> None:
    assert dv.beta_multiplicative([[1, 1, 0], [0, 0, 0], [0, 1, 1]], q=0)["beta"] == pytest.approx(1.5)
    assert dv.beta_multiplicative([[0, 0], [0, 0]]) == {"gamma": 0.0, "alpha": 0.0, "beta": 0.0}


def test_bray_curtis_closed_form() -> None:
    assert dv.bray_curtis([1, 2, 3], [3, 2, 1]) == pytest.approx(4 / 12)
    assert dv.bray_curtis([4, 0], [0, 4]) == 1.0
    assert dv.bray_curtis([4, 2], [4, 2]) == 0.0
    assert dv.bray_curtis([0, 0], [0, 0]) == 0.0


def test_sorensen_closed_form() -> None:
    assert dv.sorensen([1, 1, 0, 0], [0, 1, 1, 1]) == pytest.approx(1 - 2 * 1 / (2 + 3))
    assert dv.sorensen([9, 1, 0], [1, 9, 0]) == 0.0  # same species list, abundances ignored
    assert dv.sorensen([1, 0], [0, 1]) == 1.0
    assert dv.sorensen([0, 0], [0, 0]) == 0.0
    assert dv.sorensen([0, 0], [0, 3]) == 1.0


def test_dissimilarity_matrix_agrees_with_scikit_bio_and_pairs() -> None:
    rng = np.random.default_rng(7)
    table = rng.poisson(rng.gamma(0.5, 4, size=(5, 12)))
    table[2] = table[0]
    bc = dv.dissimilarity(table)
    assert bc.shape == (5, 5)
    np.testing.assert_array_equal(bc, bc.T)
    np.testing.assert_array_equal(np.diag(bc), 0.0)
    assert bc[0, 2] == 0.0
    ref = beta_diversity("braycurtis", table, ids=[str(i) for i in range(5)]).data
    np.testing.assert_allclose(bc, ref, atol=1e-12)
    so = dv.dissimilarity(table, metric="sorensen")
    for i in range(5):
        for j in range(5):
            if i != j:
                assert so[i, j] == pytest.approx(dv.sorensen(table[i], table[j]))
                assert bc[i, j] == pytest.approx(dv.bray_curtis(table[i], table[j]))


def test_bad_tables_are_rejected() -> None:
    with pytest.raises(ValueError, match="metric"):
        dv.dissimilarity([[1, 2], [3, 4]], metric="jaccard")
    with pytest.raises(ValueError, match=r"-1\.0 at site 1, species 0"):
        dv.dissimilarity([[1, 2], [-1, 4]])
    with pytest.raises(ValueError, match="two-dimensional"):
        dv.beta_multiplicative([1, 2, 3])
    with pytest.raises(ValueError, match="order q"):
        dv.beta_multiplicative([[1, 2]], q=3)
    with pytest.raises(ValueError, match="equal length"):
        dv.bray_curtis([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="nan"):
        dv.sorensen([1, float("nan")], [1, 2])
