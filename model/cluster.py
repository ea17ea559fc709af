"""Latent clusters (DESIGN §5): a Gaussian mixture over μ, novelty, stable-ID alignment. Pure.

Two ways to choose the number of components, both up to ``k_max``:

- ``"dp"`` (default): a variational Dirichlet-process mixture (``BayesianGaussianMixture``, truncated at
  ``k_max``) switches off the components the data do not need. On the paper's data it measured better than BIC:
  a VAE latent is not a union of Gaussians, and BIC keeps adding components to fit curved clusters (K = 18–19
  for 11 species), where the DP mixture settles at 9–12 (docs/RESULTS.md).
- ``"bic"``: full-covariance mixtures for K = k_min … k_max, lowest BIC wins (the paper's choice).

Either way the result is stored as a plain mixture (weights, means, covariances), so assigning new events needs
nothing but those arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

NOVEL = -1
METHODS = ("dp", "bic")


@dataclass(frozen=True)
class ClusterConfig:
    method: str = "dp"
    k_min: int = 1  # bic: K in [k_min, k_max]
    k_max: int = 20  # dp: truncation level
    concentration: float = 1e-2  # dp: Dirichlet-process concentration (smaller → fewer clusters)
    min_weight: float = 1e-3  # dp: components below this weight are dropped
    n_init: int = 2
    dp_inits: tuple[str, ...] = ("kmeans", "k-means++", "random_from_data")  # dp: kinds of start, best bound kept
    max_fit_events: int = 20_000  # larger sets are subsampled for the fit (seeded)
    novelty_quantile: float = 0.995  # training events above this quantile of either score are "novel"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (self.concentration > 0 and 0 <= self.min_weight < 1):
            raise ValueError(
                f"need concentration > 0 and 0 <= min_weight < 1, got {self.concentration}, {self.min_weight}"
            )
        if not self.dp_inits or not set(self.dp_inits) <= {"kmeans", "k-means++", "random", "random_from_data"}:
            raise ValueError(f"dp_inits must name kmeans, k-means++, random or random_from_data, got {self.dp_inits!r}")
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min} and {self.k_max}")
        if not 0.5 < self.novelty_quantile <= 1:
            raise ValueError(f"novelty_quantile must be in (0.5, 1], got {self.novelty_quantile}")


@dataclass
class Assignment:
    cluster: np.ndarray  # (events,) int64 stable IDs, NOVEL for novel events
    probability: np.ndarray  # (events,) posterior of the chosen component
    novelty: np.ndarray  # (events,) ≥ 0; > 1 means beyond the training quantile of likelihood or reconstruction


@dataclass
class LatentClusterer:
    """A fitted full-covariance mixture. ``ids[j]`` is the stable cluster ID of component j."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, latent)
    covariances: np.ndarray  # (K, latent, latent)
    ids: np.ndarray  # (K,) int64
    nll_threshold: float  # −log-likelihood of μ at the novelty quantile of training events
    rec_threshold: float  # reconstruction error at the same quantile
    bic: np.ndarray  # (K tried, 2): K and its BIC, for the record (empty for "dp")

    @property
    def k(self) -> int:
        return len(self.weights)

    @functools.cached_property
    def _precisions_cholesky(self) -> np.ndarray:
        """(K, latent, latent): ``P`` with ``P Pᵀ = Σ⁻¹``, as sklearn's ``precisions_cholesky_`` (full)."""
        eye = np.eye(self.means.shape[1])
        return np.stack(
            [
                scipy.linalg.solve_triangular(scipy.linalg.cholesky(c, lower=True), eye, lower=True).T
                for c in self.covariances
            ]
        )

    def _weighted_log_prob(self, mu: np.ndarray) -> np.ndarray:
        """(events, K): log wₖ + log N(μ | meansₖ, Σₖ), as ``GaussianMixture._estimate_weighted_log_prob``;
        here without sklearn's per-call checks, which cost milliseconds on the small batches of the serving loop."""
        pc = self._precisions_cholesky
        d = mu.shape[1]
        y = np.einsum("nd,kde->nke", mu, pc) - np.einsum("kd,kde->ke", self.means, pc)[None]
        log_det = np.log(np.diagonal(pc, axis1=1, axis2=2)).sum(axis=1)
        return -0.5 * (d * np.log(2 * np.pi) + np.einsum("nke,nke->nk", y, y)) + log_det + np.log(self.weights)

    def score_samples(self, mu: np.ndarray) -> np.ndarray:
        """(events,) log-likelihood of each μ under the mixture."""
        return _logsumexp(self._weighted_log_prob(np.asarray(mu, np.float64)))

    def assign(self, mu: np.ndarray, rec_error: np.ndarray | None = None) -> Assignment:
        """Cluster IDs, posteriors and novelty for latent means ``mu`` (events, latent)."""
        mu = np.asarray(mu, dtype=np.float64)
        if len(mu) == 0:
            return Assignment(np.empty(0, np.int64), np.empty(0), np.empty(0))
        wlp = self._weighted_log_prob(mu)
        score = _logsumexp(wlp)
        comp = wlp.argmax(axis=1)
        probability = np.exp(wlp[np.arange(len(mu)), comp] - score)
        novelty = _ratio(-score, self.nll_threshold)
        if rec_error is not None:
            novelty = np.maximum(novelty, _ratio(np.asarray(rec_error, np.float64), self.rec_threshold))
        cluster = np.where(novelty > 1, NOVEL, self.ids[comp]).astype(np.int64)
        return Assignment(cluster, probability, novelty)

    def components(self, mu: np.ndarray) -> np.ndarray:
        """Mixture component (not stable ID) of each row, ignoring novelty."""
        return self._weighted_log_prob(np.asarray(mu, np.float64)).argmax(axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights,
            "means": self.means,
            "covariances": self.covariances,
            "ids": self.ids,
            "thresholds": np.array([self.nll_threshold, self.rec_threshold]),
            "bic": self.bic,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LatentClusterer:
        k = len(a["weights"])
        shapes_ok = (
            a["means"].ndim == 2
            and a["means"].shape[0] == k
            and a["covariances"].shape == (k, a["means"].shape[1], a["means"].shape[1])
            and a["ids"].shape == (k,)
            and a["thresholds"].shape == (2,)
        )
        if not shapes_ok or k == 0:
            raise ValueError("clusterer arrays have inconsistent shapes")
        if not all(np.isfinite(v).all() for v in a.values()):
            raise ValueError("clusterer arrays contain non-finite values")
        return cls(
            a["weights"].astype(np.float64),
            a["means"].astype(np.float64),
            a["covariances"].astype(np.float64),
            a["ids"].astype(np.int64),
            float(a["thresholds"][0]),
            float(a["thresholds"][1]),
            a["bic"].astype(np.float64),
        )


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σⱼ exp(a[:, j]), stable; (events, K) → (events,)."""
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]


def _ratio(score: np.ndarray, threshold: float) -> np.ndarray:
    """Score relative to its threshold, shifted so that the threshold maps to 1 whatever the sign of scores."""
    return np.maximum(0.0, 1.0 + (score - threshold) / max(abs(threshold), 1e-12))


def dp_mixture(cfg: ClusterConfig, k_max: int, init: str) -> BayesianGaussianMixture:
    """The (unfitted) variational Dirichlet-process mixture of ``cfg``, truncated at ``k_max``, started by ``init``."""
    return BayesianGaussianMixture(
        n_components=k_max,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=cfg.concentration,
        n_init=cfg.n_init,
        init_params=init,
        max_iter=500,
        random_state=cfg.seed,
        reg_covar=1e-6,
    )


def fit_clusterer(mu: np.ndarray, rec_error: np.ndarray, cfg: ClusterConfig) -> LatentClusterer:
    """Fit a mixture to ``mu`` (events, latent), K chosen by ``cfg.method``; novelty thresholds from the same events."""
    mu = np.asarray(mu, dtype=np.float64)
    if len(mu) < 2:
        raise ValueError(f"need at least 2 events to fit clusters, got {len(mu)}")
    rng = np.random.default_rng(cfg.seed)
    fit_on = mu if len(mu) <= cfg.max_fit_events else mu[rng.choice(len(mu), cfg.max_fit_events, replace=False)]
    k_max = min(cfg.k_max, len(fit_on))
    bics = []
    if cfg.method == "dp":
        # Variational fits end in local optima, and restarts from one kind of initialisation tend to end in the
        # same one: each kind of start is tried, and the fit with the highest lower bound (the model's own,
        # unsupervised criterion: same prior, same events) is kept.
        dp = max((dp_mixture(cfg, k_max, init).fit(fit_on) for init in cfg.dp_inits), key=lambda f: f.lower_bound_)
        keep = dp.weights_ >= cfg.min_weight
        keep[np.argmax(dp.weights_)] = True
        weights, means, covariances = (
            dp.weights_[keep] / dp.weights_[keep].sum(),
            dp.means_[keep],
            dp.covariances_[keep],
        )
    else:
        best: tuple[float, GaussianMixture] | None = None
        for k in range(cfg.k_min, k_max + 1):
            gm = GaussianMixture(k, covariance_type="full", n_init=cfg.n_init, random_state=cfg.seed, reg_covar=1e-6)
            gm.fit(fit_on)
            bic = float(gm.bic(fit_on))
            bics.append((k, bic))
            if best is None or bic < best[0]:
                best = (bic, gm)
        assert best is not None
        weights, means, covariances = best[1].weights_, best[1].means_, best[1].covariances_
    order = np.argsort(-weights)  # component 0 = largest cluster; IDs 0…K−1 in that order
    k = len(order)
    clusterer = LatentClusterer(
        weights[order],
        means[order],
        covariances[order],
        np.arange(k, dtype=np.int64),
        0.0,
        0.0,
        np.array(bics, dtype=np.float64).reshape(-1, 2),
    )
    q = cfg.novelty_quantile
    clusterer.nll_threshold = float(np.quantile(-clusterer.score_samples(mu), q))
    clusterer.rec_threshold = float(np.quantile(np.asarray(rec_error, np.float64), q))
    return clusterer


def align_ids(
    old: np.ndarray, new_components: np.ndarray, n_new: int, next_id: int, min_overlap: int = 1
) -> np.ndarray:
    """Stable IDs for a new mixture's components, from the same events assigned by both models.

    Parameters
    ----------
    old : (events,) cluster IDs the serving model gave (NOVEL rows are ignored).
    new_components : (events,) component index 0…n_new−1 the new model gives the same events.
    n_new : number of components of the new mixture.
    next_id : smallest ID never used before; unmatched components get next_id, next_id + 1, …
    min_overlap : a match needs at least this many shared events.

    Returns
    -------
    (n_new,) int64: the ID of each new component. Hungarian assignment maximising shared events.
    """
    keep = old != NOVEL
    old, new_components = old[keep], new_components[keep]
    old_ids = np.unique(old)
    ids = np.full(n_new, -1, dtype=np.int64)
    if len(old_ids):
        overlap = np.zeros((n_new, len(old_ids)), dtype=np.int64)  # (new component, old ID)
        np.add.at(overlap, (new_components, np.searchsorted(old_ids, old)), 1)
        rows, cols = scipy.optimize.linear_sum_assignment(overlap, maximize=True)
        for r, c in zip(rows, cols, strict=True):
            if overlap[r, c] >= min_overlap:
                ids[r] = old_ids[c]
    fresh = np.flatnonzero(ids < 0)
    ids[fresh] = next_id + np.arange(len(fresh))
    return ids
