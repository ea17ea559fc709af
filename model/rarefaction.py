"""Rarefaction and extrapolation of Hill numbers, by sample size and by sample coverage. Pure.

Why: a window of 40 events and one of 4,000 see different shares of their communities, so their raw Hill numbers
cannot be compared. Chao & Jost (2012) and Chao et al. (2014) compare samples at a *common coverage* instead:
each sample is rarefied (interpolated down) or extrapolated up to the size m at which it would cover the same
share C of its community's individuals. The formulas, their edge branches and the numerical search for m are
those of iNEXT 3.0.2 (``TD.m.est``, ``RTD``, ``Chat.Ind``, ``invChat.Ind``), so results match the R package.

Sizes m are numbers of individuals (events) and may be fractional: between integers iNEXT interpolates
linearly, and so does this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.special

from model.hill import Q, as_counts, coverage_ratio, estimated

__all__ = ["coverage_at_size", "hill_at_coverage", "hill_at_size", "rarefaction_curve", "size_for_coverage"]

_OPTIMIZE_TOL = float(np.finfo(np.float64).eps) ** 0.25  # R's optimize() default, as iNEXT calls it


@dataclass(frozen=True)
class _Sample:
    """One sample's sufficient statistics, computed once and shared by every size or coverage asked of it."""

    values: np.ndarray  # distinct positive abundances
    freq: np.ndarray  # how many species have each of those abundances
    n: int
    f1: int
    f2: int
    observed: np.ndarray  # (3,) plug-in Hill numbers q = 0, 1, 2
    asymptotic: np.ndarray  # (3,) iNEXT's estimators
    slope: np.ndarray  # (3,) iNEXT's β: how fast q0, q1 approach their asymptote per extra individual
    simpson: float  # Σ xᵢ(xᵢ − 1) / (n(n − 1)), the unbiased Simpson concentration (0 when n < 2)

    @property
    def coverage_a(self) -> float:
        return coverage_ratio(self.n, self.f1, self.f2)


def _sample(counts: Any) -> _Sample:
    x = as_counts(counts)
    values, freq = np.unique(x, return_counts=True)
    n = int(x.sum())
    f1, f2 = int(np.count_nonzero(x == 1)), int(np.count_nonzero(x == 2))
    if n == 0:
        zeros = np.zeros(3)
        return _Sample(values, freq, 0, 0, 0, zeros, zeros, zeros, 0.0)
    p = x / n
    obs = np.array([x.size, math.exp(-float(np.sum(p * np.log(p)))), 1.0 / float(np.sum(p * p))])
    est = estimated(x)
    asy = np.array([est[k] for k in Q])
    before = _rtd(values, freq, n, n - 1)  # D at n − 1: the last step of the rarefaction curve
    slope = np.zeros(3)
    for i in (0, 1):
        if asy[i] != before[i]:
            slope[i] = (obs[i] - before[i]) / (asy[i] - before[i])
    simpson = float(np.sum(freq * values * (values - 1))) / (n * (n - 1)) if n > 1 else 0.0
    return _Sample(values, freq, n, f1, f2, obs, asy, slope, simpson)


def _lchoose(a: Any, b: Any) -> Any:
    return scipy.special.gammaln(a + 1) - scipy.special.gammaln(b + 1) - scipy.special.gammaln(a - b + 1)


def _rtd(values: np.ndarray, freq: np.ndarray, n: int, m: int) -> np.ndarray:
    """Expected Hill numbers q = 0, 1, 2 of a random subsample of m ≤ n individuals (iNEXT's ``RTD``).

    A species seen xᵢ times is seen k times in the subsample with hypergeometric probability
    C(xᵢ, k)·C(n − xᵢ, m − k)/C(n, m); iNEXT sums over k = 1…m for every species. Only the support of each
    distribution is visited here (k from max(1, m − n + xᵢ) to min(xᵢ, m), and within 40 s.d. of the mean), so
    the work is at most O(n), not O(S·m).
    """
    if m <= 0:
        return np.array([0.0, 1.0, math.inf])
    lo = np.maximum(1, m - (n - values))
    hi = np.minimum(values, m)
    # Beyond 40 s.d. (+50) of its mean a hypergeometric probability is below e^−130 (Bernstein's bound):
    # skipping those terms keeps windows of millions of events cheap without changing a digit.
    mean = m * values / n
    sd = np.sqrt(m * (values / n) * (1 - values / n) * (n - m) / max(n - 1, 1))
    width = np.ceil(40 * sd + 50).astype(np.int64)
    lo = np.maximum(lo, np.floor(mean).astype(np.int64) - width)
    hi = np.minimum(hi, np.ceil(mean).astype(np.int64) + width)
    length = np.maximum(hi - lo + 1, 0)
    owner = np.repeat(np.arange(values.size), length)  # (support points,) index of the species value
    start = np.cumsum(length) - length
    k = (lo[owner] + np.arange(owner.size) - start[owner]).astype(np.float64)
    v = values[owner].astype(np.float64)
    weight = freq[owner] * np.exp(_lchoose(v, k) + _lchoose(n - v, m - k) - float(_lchoose(np.float64(n), m)))
    share = k / m
    return np.array(
        [weight.sum(), math.exp(float(np.sum(-share * np.log(share) * weight))), 1 / np.sum(share**2 * weight)]
    )


def _coverage_int(s: _Sample, m: int) -> float:
    """Ĉ at an integer size m (iNEXT's ``Chat.Ind``)."""
    if m >= s.n:
        return 1.0 - s.f1 / s.n * s.coverage_a ** (m - s.n + 1)
    keep = (s.n - s.values) >= m
    xv, fv = s.values[keep].astype(np.float64), s.freq[keep]
    g = scipy.special.gammaln
    terms = xv / s.n * np.exp(g(s.n - xv + 1) - g(s.n - xv - m + 1) - g(s.n) + g(s.n - m))
    return 1.0 - float(np.sum(fv * terms))


def _coverage(s: _Sample, m: float) -> float:
    if s.n == 0:
        return 0.0
    if m > s.n:
        return 1.0 - s.f1 / s.n * s.coverage_a ** (m - s.n + 1)
    lo, hi = math.floor(m), math.ceil(m)
    if lo == hi:
        return _coverage_int(s, lo)
    return (hi - m) * _coverage_int(s, lo) + (m - lo) * _coverage_int(s, hi)


def _hill(s: _Sample, m: float) -> np.ndarray:
    """Hill numbers q = 0, 1, 2 at size m (iNEXT's ``TD.m.est``)."""
    if s.n == 0:
        return np.zeros(3)
    if m < s.n:
        lo, hi = math.floor(m), math.ceil(m)
        if lo == hi:
            return _rtd(s.values, s.freq, s.n, lo)
        return (hi - m) * _rtd(s.values, s.freq, s.n, lo) + (m - lo) * _rtd(s.values, s.freq, s.n, hi)
    if m == s.n:
        return s.observed.copy()
    extra = m - s.n
    out = np.empty(3)
    # q = 0, 1 approach their asymptote geometrically; q = 2 has an exact form (its asymptote may be infinite).
    out[:2] = s.observed[:2] + (s.asymptotic[:2] - s.observed[:2]) * (1 - (1 - s.slope[:2]) ** extra)
    out[2] = 1 / (1 / m + (1 - 1 / m) * s.simpson)
    return out


def _check_size(m: float, least: float) -> float:
    m = float(m)
    if not math.isfinite(m) or m < least:
        raise ValueError(f"sample size m must be a finite number ≥ {least:g}, got {m!r}")
    return m


def _check_q(q: int) -> int:
    if q not in (0, 1, 2):
        raise ValueError(f"order q must be 0, 1 or 2, got {q!r}")
    return int(q)


def coverage_at_size(counts: Any, m: float) -> float:
    """Expected sample coverage of a sample of m individuals from this community (iNEXT's ``Chat.Ind``).

    Rarefaction (m < n) is exact for integer m: 1 − Σ (xᵢ/n)·C(n − xᵢ, m)/C(n − 1, m); extrapolation (m > n)
    is 1 − (f1/n)·A^(m−n+1) (Chao et al. 2014). Dimensionless in [0, 1]; 0 for an empty sample.
    """
    return _coverage(_sample(counts), _check_size(m, 0.0))


def hill_at_size(counts: Any, m: float, q: int) -> float:
    """Hill number of order q expected in a sample of m ≥ 1 individuals (iNEXT's ``TD.m.est``).

    Below n: the expectation over random subsamples (:func:`_rtd`). Above n, for q = 0 and 1: the observed
    value approaches the asymptotic estimate as 1 − (1 − β)^(m−n), β fitted at the last rarefaction step; for
    q = 2 the exact 1/(1/m + (1 − 1/m)·Σxᵢ(xᵢ − 1)/(n(n − 1))). 0 for an empty sample.
    """
    s = _sample(counts)
    return float(_hill(s, _check_size(m, 1.0))[_check_q(q)])


def _brent_fmin(f: Any, lower: float, upper: float, tol: float) -> float:
    """Brent's minimiser exactly as R's ``optimize`` runs it (``Brent_fmin`` in R's ``optimize.c``).

    Ported step for step because iNEXT reports the size its search stops at, to about ``tol`` (1.2e−4), not the
    exact root; the same steps give the same m.
    """
    c = (3.0 - math.sqrt(5.0)) * 0.5
    eps = math.sqrt(float(np.finfo(np.float64).eps))
    a, b = lower, upper
    v = w = x = a + c * (b - a)
    d = e = 0.0
    fx = fv = fw = f(x)
    tol3 = tol / 3.0
    while True:
        xm = (a + b) * 0.5
        tol1 = eps * abs(x) + tol3
        t2 = tol1 * 2.0
        if abs(x - xm) <= t2 - (b - a) * 0.5:
            return x
        p = q = r = 0.0
        if abs(e) > tol1:  # fit a parabola
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = (q - r) * 2.0
            if q > 0.0:
                p = -p
            else:
                q = -q
            r = e
            e = d
        if abs(p) >= abs(q * 0.5 * r) or p <= q * (a - x) or p >= q * (b - x):  # golden-section step
            e = (b - x) if x < xm else (a - x)
            d = c * e
        else:  # parabolic-interpolation step
            d = p / q
            u = x + d
            if u - a < t2 or b - u < t2:
                d = tol1 if x < xm else -tol1
        if abs(d) >= tol1:
            u = x + d
        elif d > 0.0:
            u = x + tol1
        else:
            u = x - tol1
        fu = f(u)
        if fu <= fx:
            if u < x:
                b = x
            else:
                a = x
            v, w, x = w, x, u
            fv, fw, fx = fw, fx, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv = w, fw
                w, fw = u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu


def _size_for(s: _Sample, goal: float) -> float:
    if s.n == 0:
        return 0.0
    reached = _coverage(s, s.n)
    if reached == goal:
        m = float(s.n)
    elif reached > goal:
        m = _brent_fmin(lambda size: abs(_coverage(s, size) - goal), 0.0, float(s.n), _OPTIMIZE_TOL)
    else:
        # Solve 1 − (f1/n)·A^(m−n+1) = C for m; reached < C implies f1 > 0, and C = 1 is never reached.
        f1, f2, n = s.f1, s.f2, s.n
        if f2 > 0:
            a = (n - 1) * f1 / ((n - 1) * f1 + 2 * f2)
        elif f1 > 1:
            a = (n - 1) * (f1 - 1) / ((n - 1) * (f1 - 1) + 2)
        else:
            a = 0.0
        if a == 0.0:
            m = float(n)
        elif goal >= 1.0:
            return math.inf
        else:
            m = n + (math.log(n / f1) + math.log(1 - goal)) / math.log(a) - 1
    return max(m, 1.0)


def _check_coverage(c: float) -> float:
    c = float(c)
    if not 0.0 < c <= 1.0:
        raise ValueError(f"coverage C must be in (0, 1], got {c!r}")
    return c


def size_for_coverage(counts: Any, C: float) -> float:
    """The sample size m (individuals, possibly fractional) at which this sample's coverage would be C
    (iNEXT's ``invChat.Ind``).

    Below the sample's own coverage m is found by R's ``optimize`` on |Ĉ(m) − C| over [0, n] (replicated so as
    to return iNEXT's m); above it, by solving the extrapolated coverage in closed form. At least 1; ``inf``
    when C = 1 cannot be reached; 0 for an empty sample.
    """
    return _size_for(_sample(counts), _check_coverage(C))


def hill_at_coverage(counts: Any, C: float, q: int) -> float:
    """Hill number of order q standardised to coverage C (iNEXT's ``estimateD(base = "coverage")``).

    The figure to compare between windows of different sizes: each is rarefied or extrapolated to the size at
    which it covers the same share C of its community.
    """
    s = _sample(counts)
    return float(_hill(s, _size_for(s, _check_coverage(C)))[_check_q(q)])


def rarefaction_curve(counts: Any, sizes: Any) -> list[dict[str, Any]]:
    """The rarefaction/extrapolation curve at the given sizes: one dict per size with ``m``, ``method``
    (``"rarefaction"`` below n, ``"observed"`` at n, ``"extrapolation"`` above), ``coverage`` and ``q0``,
    ``q1``, ``q2``.
    """
    s = _sample(counts)
    rows: list[dict[str, Any]] = []
    for raw in np.atleast_1d(np.asarray(sizes, dtype=np.float64)):
        m = _check_size(float(raw), 1.0)
        method = "rarefaction" if m < s.n else ("observed" if m == s.n else "extrapolation")
        d = _hill(s, m)
        rows.append(
            {"m": m, "method": method, "coverage": _coverage(s, m), **{k: float(d[i]) for i, k in enumerate(Q)}}
        )
    return rows
