"""Hill numbers of one abundance sample: observed, asymptotic, and sample coverage. Pure.

Every formula follows iNEXT 3.0.2 (Hsieh, Ma & Chao 2016), the reference implementation of Chao et al. (2014), so
that the figures Wingbeat prints can be checked against the R package number for number
(``data/inext_reference.json``). Orders: q = 0 (richness), 1 (exponential of Shannon entropy, nats) and
2 (inverse Simpson concentration).

scikit-bio supplies what it has and what agrees with iNEXT: the observed Hill numbers (``hill``) and the unbiased
inverse Simpson (``inv_simpson(finite=True)``). Its ``chao1`` is not iNEXT's estimator (it omits the (n − 1)/n
factor and applies the bias correction to every sample, not only to those without doubletons), so Chao1 is
written here. Bootstrap replicates need the estimators on a whole matrix of samples at once, so the same
formulas also exist in vectorised form (:func:`estimate_rows`); tests hold the two forms equal.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.special
from skbio.diversity import alpha as skbio_alpha

__all__ = [
    "Q",
    "as_counts",
    "chao1_undetected",
    "coverage_ratio",
    "estimate_rows",
    "estimated",
    "observed",
    "sample_coverage",
]

Q = ("q0", "q1", "q2")


def as_counts(counts: Any) -> np.ndarray:
    """Validate abundances and return the positive ones as ``int64``, zeros dropped.

    Raises
    ------
    ValueError
        If ``counts`` is not one-dimensional or holds a negative, non-finite or non-integer value; the message
        names the value and its index.
    """
    arr = np.asarray(counts)
    if arr.ndim != 1:
        raise ValueError(f"counts must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"counts must be numbers, got dtype {arr.dtype} (first value {arr[0].item()!r})")
    if arr.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"counts must be finite integers, got {arr[i].item()!r} at index {i}")
    if (arr < 0).any():
        i = int(np.argmax(arr < 0))
        raise ValueError(f"counts must be non-negative, got {arr[i].item()!r} at index {i}")
    x = arr.astype(np.int64)
    return x[x > 0]


def chao1_undetected(n: float, f1: Any, f2: Any) -> Any:
    """Chao1's estimate f̂0 of the species present but undetected, in iNEXT's form.

    ``(n − 1)/n · f1²/(2 f2)`` when there are doubletons, else the bias-corrected ``(n − 1)/n · f1(f1 − 1)/2``.
    Works elementwise on arrays of ``f1``/``f2`` (one sample size ``n``).
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if n <= 0:
        return np.zeros_like(f1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(f2 > 0, (n - 1) / n * f1 * f1 / (2 * f2), (n - 1) / n * f1 * (f1 - 1) / 2)
    return out


def coverage_ratio(n: float, f1: int, f2: int) -> float:
    """The factor A in Ĉ = 1 − (f1/n)·A: ``n f̂0 / (n f̂0 + f1)``, or 1 without singletons (Chao & Jost 2012)."""
    if f1 == 0:
        return 1.0
    f0 = float(chao1_undetected(n, f1, f2))
    return n * f0 / (n * f0 + f1)


def observed(counts: Any) -> dict[str, float]:
    """Hill numbers of the sample itself (plug-in proportions pᵢ = xᵢ/n).

    Returns ``{"q0": S_obs, "q1": exp(−Σ pᵢ ln pᵢ), "q2": 1/Σ pᵢ²}``, in effective numbers of species; all 0 for
    an empty sample.
    """
    x = as_counts(counts)
    if x.size == 0:
        return dict.fromkeys(Q, 0.0)
    return {f"q{q}": float(skbio_alpha.hill(x, order=q)) for q in (0, 1, 2)}


def sample_coverage(counts: Any) -> float:
    """Estimated sample coverage Ĉ (Chao & Jost 2012), iNEXT's ``SC``: the share of the community's individuals
    that belong to species already in the sample.

    Ĉ = 1 − (f1/n)·A with A = (n − 1)f1 / ((n − 1)f1 + 2 f2) (see :func:`coverage_ratio` for the edge branches).
    Dimensionless, in [0, 1]; defined as 0 for an empty sample (nothing is known to be covered).
    """
    x = as_counts(counts)
    n = int(x.sum())
    if n == 0:
        return 0.0
    f1 = int(np.count_nonzero(x == 1))
    f2 = int(np.count_nonzero(x == 2))
    return 1.0 - f1 / n * coverage_ratio(n, f1, f2)


def _shannon_tail(n: int, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """Chao, Wang & Jost (2013)'s correction for the entropy of undetected species, iNEXT's ``D1_2nd``.

    (f1/n)·(1 − A)^(1−n)·(−ln A − Σ_{r=1}^{n−1} (1 − A)^r / r) with A = 2f2 / ((n − 1)f1 + 2f2), or
    2 / ((n − 1)(f1 − 1) + 2) without doubletons. iNEXT rounds the bracket to 1e−12, so drops the term when the
    bracket is below 5e−13; the same is done here, so that estimates agree with iNEXT to its printed precision.
    The bracket is the tail Σ_{r≥n} (1 − A)^r / r = (1 − A)^n·Φ(1 − A, 1, n), computed without cancellation
    (:func:`_lerch`).
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    out = np.zeros(np.broadcast(f1, f2).shape)
    if n < 2:
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(f2 > 0, 2 * f2 / ((n - 1) * f1 + 2 * f2), np.where(f1 > 0, 2 / ((n - 1) * (f1 - 1) + 2), 1.0))
    active = (f1 > 0) & (a < 1)
    keys, where = np.unique(a[active], return_inverse=True)
    if keys.size == 0:
        return out
    log_y = np.log1p(-keys)
    with np.errstate(over="ignore", under="ignore"):
        rounded = np.round(np.exp(n * log_y) * _lerch(keys, n) * 1e12) / 1e12
        # (1 − A)^(1−n) can exceed a float's range before it meets the small bracket: multiply in logs.
        with np.errstate(divide="ignore"):
            factor = np.where(rounded > 0, np.exp((1 - n) * log_y + np.log(np.maximum(rounded, 1e-300))), 0.0)
    out[active] = f1[active] / n * factor[where]
    return out


_BERNOULLI = (1 / 6, -1 / 30, 1 / 42, -1 / 30, 5 / 66)
_DIRECT_TERMS = 512


def _lerch(a: np.ndarray, n: int) -> np.ndarray:
    """Φ(1 − a, 1, n) = Σ_{k≥0} (1 − a)^k / (n + k) for each 0 < a < 1 and one n ≥ 1, to about 1e−15 relative.

    Three regimes keep the cost bounded whatever n: the series itself where it converges within 512 terms;
    Euler–Maclaurin around e^{αn}E1(αn) (α = −ln(1 − a)) where n ≥ 64, every correction being below
    ((α + 1/n)/2π)^{2p}; and otherwise (small n, tiny a) the identity Φ = y^{−n}(−ln a − Σ_{r<n} y^r/r) in
    extended precision, as iNEXT evaluates it.
    """
    a = np.asarray(a, dtype=np.float64)
    alpha = -np.log1p(-a)
    out = np.empty_like(a)
    direct = 40.0 / alpha <= _DIRECT_TERMS
    if direct.any():
        k = np.arange(_DIRECT_TERMS, dtype=np.float64)
        with np.errstate(under="ignore"):
            out[direct] = np.sum(np.exp(-alpha[direct, None] * k) / (n + k), axis=1)
    rest = ~direct
    if rest.any() and n >= 64:
        al = alpha[rest]
        x = al * n
        with np.errstate(over="ignore"):
            small = np.exp(np.minimum(x, 500.0)) * scipy.special.exp1(np.minimum(x, 500.0))
        big = sum((-1) ** k * math.factorial(k) / x ** (k + 1) for k in range(20))  # e^x E1(x), x > 500
        total = np.where(x <= 500.0, small, big) + 1 / (2 * n)
        for p, b2p in enumerate(_BERNOULLI, start=1):
            m = 2 * p - 1
            deriv = sum(
                math.comb(m, j) * (-al) ** (m - j) * (-1) ** j * math.factorial(j) / n ** (j + 1) for j in range(m + 1)
            )
            total = total - b2p / math.factorial(2 * p) * deriv
        out[rest] = total
    elif rest.any():
        yl = np.longdouble(1) - a[rest].astype(np.longdouble)
        r = np.arange(1, n, dtype=np.longdouble)
        partial = np.sum(yl[:, None] ** r / r, axis=1)
        out[rest] = ((-np.log(a[rest].astype(np.longdouble)) - partial) / yl**n).astype(np.float64)
    return out


def estimate_rows(samples: np.ndarray) -> np.ndarray:
    """Asymptotic Hill numbers for many samples of the same size at once (bootstrap replicates).

    Parameters
    ----------
    samples : (rows, species) non-negative integer array; every row sums to the same n.

    Returns
    -------
    (rows, 3) array: q = 0, 1, 2 estimates per row (q2 is ``inf`` where no species was seen twice).
    """
    x = np.asarray(samples, dtype=np.int64)
    n = int(x[0].sum()) if x.shape[0] else 0
    out = np.zeros((x.shape[0], 3))
    if n == 0:
        return out
    f1 = np.count_nonzero(x == 1, axis=1)
    f2 = np.count_nonzero(x == 2, axis=1)
    out[:, 0] = np.count_nonzero(x, axis=1) + chao1_undetected(n, f1, f2)
    # Σ (xᵢ/n)(ψ(n) − ψ(xᵢ)): the first-order unbiased entropy of Chao et al. (2013).
    psi = scipy.special.digamma(np.maximum(x, 1).astype(np.float64))  # (rows, species)
    head = np.where(x > 0, x / n * (float(scipy.special.digamma(n)) - psi), 0.0).sum(axis=1)
    out[:, 1] = np.exp(head + _shannon_tail(n, f1, f2))
    pairs = (x * (x - 1)).sum(axis=1).astype(np.float64)
    with np.errstate(divide="ignore"):
        out[:, 2] = np.where(pairs > 0, n * (n - 1) / np.maximum(pairs, 1), np.inf)
    return out


def estimated(counts: Any) -> dict[str, float]:
    """Asymptotic Hill numbers: what the sample says about the whole community (iNEXT's ``Estimator``).

    - q = 0: Chao1, S_obs + f̂0 (:func:`chao1_undetected`).
    - q = 1: Chao, Wang & Jost (2013): exp(Σᵢ (xᵢ/n)(ψ(n) − ψ(xᵢ)) + the undetected-species term).
    - q = 2: the unbiased inverse Simpson n(n − 1) / Σ xᵢ(xᵢ − 1); ``inf`` when no species was seen twice
      (iNEXT gives ``Inf`` too: the sample cannot bound the community's dominance).

    All 0 for an empty sample.
    """
    x = as_counts(counts)
    if x.size == 0:
        return dict.fromkeys(Q, 0.0)
    q0, q1, q2 = estimate_rows(x[np.newaxis, :])[0]
    if np.isfinite(q2):
        q2 = float(skbio_alpha.inv_simpson(x, finite=True))
    return {"q0": float(q0), "q1": float(q1), "q2": float(q2)}
