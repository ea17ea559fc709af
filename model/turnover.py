"""Diversity between sites or windows: multiplicative beta and pairwise dissimilarities. Pure.

A site here is any abundance vector over the same species (cluster) axis: a station, a day, an hour.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["METRICS", "beta_multiplicative", "bray_curtis", "dissimilarity", "sorensen"]

METRICS = ("bray_curtis", "sorensen")


def _as_table(table: Any) -> np.ndarray:
    """A (sites, species) float array of non-negative finite abundances; the error names the bad cell."""
    arr = np.asarray(table)
    if arr.ndim != 2:
        raise ValueError(f"table must be two-dimensional (sites, species), got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "biuf":
        raise ValueError(f"table must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"abundances must be non-negative and finite, got {arr[i, j].item()!r} at site {i}, species {j}"
        )
    return arr


def _pair(a: Any, b: Any) -> np.ndarray:
    a_, b_ = np.asarray(a), np.asarray(b)
    if a_.ndim != 1 or b_.ndim != 1 or a_.shape != b_.shape:
        raise ValueError(f"a and b must be 1-D abundance vectors of equal length, got shapes {a_.shape} and {b_.shape}")
    return _as_table(np.stack([a_, b_]))


def _hill_of(p: np.ndarray, q: int) -> float:
    """Hill number of order q of one relative-abundance vector (Σ p = 1)."""
    p = p[p > 0]
    if q == 0:
        return float(p.size)
    if q == 1:
        return math.exp(-float(np.sum(p * np.log(p))))
    return 1.0 / float(np.sum(p**q)) ** (1 / (q - 1))


def beta_multiplicative(table: Any, q: int = 1) -> dict[str, float]:
    """Jost's (2007) multiplicative partition of diversity, sites weighted equally.

    Each site's abundances become relative abundances pᵢⱼ. Gamma is the Hill number of the pooled community
    p̄ⱼ = meanᵢ pᵢⱼ; alpha is Jost's mean within-site diversity, (meanᵢ Σⱼ pᵢⱼ^q)^(1/(1−q)) (for q = 1,
    exp(meanᵢ Hᵢ); for q = 0, the mean richness); beta = gamma / alpha is the effective number of completely
    distinct sites: 1 when all sites hold the same community, N when N equally diverse sites share no species.

    Sites without individuals carry no relative abundances and are left out; with none left every figure is 0.
    """
    if q not in (0, 1, 2):
        raise ValueError(f"order q must be 0, 1 or 2, got {q!r}")
    x = _as_table(table)
    x = x[x.sum(axis=1) > 0]
    if x.shape[0] == 0:
        return {"gamma": 0.0, "alpha": 0.0, "beta": 0.0}
    p = x / x.sum(axis=1, keepdims=True)  # (sites, species)
    gamma = _hill_of(p.mean(axis=0), q)
    if q == 0:
        alpha = float(np.count_nonzero(p, axis=1).mean())
    elif q == 1:
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
        alpha = math.exp(float(entropy.mean()))
    else:
        alpha = 1.0 / float(np.mean(np.sum(p**q, axis=1))) ** (1 / (q - 1))
    return {"gamma": gamma, "alpha": alpha, "beta": gamma / alpha}


def _bray_curtis_matrix(x: np.ndarray) -> np.ndarray:
    diff = np.abs(x[:, None, :] - x[None, :, :]).sum(axis=2)  # (sites, sites)
    total = x.sum(axis=1)
    denom = total[:, None] + total[None, :]
    return np.divide(diff, denom, out=np.zeros_like(diff), where=denom > 0)


def _sorensen_matrix(x: np.ndarray) -> np.ndarray:
    present = (x > 0).astype(np.float64)
    shared = present @ present.T  # (sites, sites) species in common
    richness = present.sum(axis=1)
    denom = richness[:, None] + richness[None, :]
    out = np.divide(2 * shared, denom, out=np.ones_like(shared), where=denom > 0)
    return 1.0 - out


def bray_curtis(a: Any, b: Any) -> float:
    """Bray–Curtis dissimilarity Σ|aⱼ − bⱼ| / Σ(aⱼ + bⱼ): 0 for equal abundances, 1 with no species shared.

    Two empty vectors are identical (0).
    """
    return float(_bray_curtis_matrix(_pair(a, b))[0, 1])


def sorensen(a: Any, b: Any) -> float:
    """Sørensen dissimilarity on incidence, 1 − 2c/(s_a + s_b) (c species shared, s richness of each).

    Ignores how many of each species; 0 for the same species list, 1 with none shared. Two empty vectors: 0.
    """
    return float(_sorensen_matrix(_pair(a, b))[0, 1])


def dissimilarity(table: Any, metric: str = "bray_curtis") -> np.ndarray:
    """Pairwise dissimilarity between the rows of a (sites, species) table: a symmetric (sites, sites) matrix
    with zero diagonal. ``metric`` is ``"bray_curtis"`` or ``"sorensen"``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    x = _as_table(table)
    out = _bray_curtis_matrix(x) if metric == "bray_curtis" else _sorensen_matrix(x)
    out = (out + out.T) / 2  # exact symmetry despite summation order
    np.fill_diagonal(out, 0.0)
    return out
