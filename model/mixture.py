"""A fitted latent mixture (DESIGN §5): assignment of new events, novelty, its arrays, and stable IDs across
versions (``align_ids``). Pure.

The mixture's components are grouped into clusters; ``model.cluster`` fits it, and assigning new events needs
nothing but these arrays (weights, means, covariances, groups, thresholds).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

NOVEL = -1


@dataclass
class Assignment:
    cluster: np.ndarray  # (events,) int64 stable IDs, NOVEL for novel events
    probability: np.ndarray  # (events,) posterior of the chosen component
    novelty: np.ndarray  # (events,) ≥ 0; > 1 means beyond the training quantile of likelihood or reconstruction


@dataclass
class LatentClusterer:
    """A fitted full-covariance mixture whose components are grouped into clusters.

    ``groups[j]`` is the cluster (0 … k−1) of component j and ``ids[c]`` the stable ID of cluster c. Without
    labels every component is its own cluster; with calibration labels, components whose labelled events are
    mostly one species form one cluster (``merge_by_labels``), so a species the mixture tiles with several
    Gaussians (a curved group in the latent) is still one cluster.
    """

    weights: np.ndarray  # (K components,)
    means: np.ndarray  # (K, latent)
    covariances: np.ndarray  # (K, latent, latent)
    ids: np.ndarray  # (k clusters,) int64
    nll_threshold: float  # −log-likelihood of μ at the novelty quantile of training events
    rec_threshold: float  # reconstruction error at the same quantile
    bic: np.ndarray  # (K tried, 2): K and its BIC, for the record (empty for "dp")
    groups: np.ndarray | None = None  # (K,) int64 cluster of each component; None: one cluster per component

    def __post_init__(self) -> None:
        if self.groups is None:
            self.groups = np.arange(len(self.weights), dtype=np.int64)

    @property
    def k(self) -> int:
        """Number of clusters (not components)."""
        return len(self.ids)

    @property
    def cluster_means(self) -> np.ndarray:
        """(k, latent): the weighted mean of each cluster's component means."""
        g = self._groups
        w = np.zeros(self.k)
        np.add.at(w, g, self.weights)
        out = np.zeros((self.k, self.means.shape[1]))
        np.add.at(out, g, self.weights[:, None] * self.means)
        return out / np.maximum(w, 1e-300)[:, None]

    @property
    def _groups(self) -> np.ndarray:
        assert self.groups is not None  # set in __post_init__
        return self.groups

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
        post = self._cluster_posterior(wlp, score)  # (events, k)
        comp = post.argmax(axis=1)
        probability = post[np.arange(len(mu)), comp]
        novelty = _ratio(-score, self.nll_threshold)
        if rec_error is not None:
            novelty = np.maximum(novelty, _ratio(np.asarray(rec_error, np.float64), self.rec_threshold))
        cluster = np.where(novelty > 1, NOVEL, self.ids[comp]).astype(np.int64)
        return Assignment(cluster, probability, novelty)

    def _cluster_posterior(self, wlp: np.ndarray, score: np.ndarray) -> np.ndarray:
        """(events, k) posterior of each cluster: the sum over its components' posteriors."""
        post = np.exp(wlp - score[:, None])  # (events, K components)
        if self.k == len(self.weights) and (self._groups == np.arange(self.k)).all():
            return post
        out = np.zeros((len(post), self.k))
        np.add.at(out.T, self._groups, post.T)
        return out

    def components(self, mu: np.ndarray) -> np.ndarray:
        """Cluster index 0 … k−1 (not stable ID) of each row, ignoring novelty."""
        wlp = self._weighted_log_prob(np.asarray(mu, np.float64))
        return self._cluster_posterior(wlp, _logsumexp(wlp)).argmax(axis=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "weights": self.weights,
            "means": self.means,
            "covariances": self.covariances,
            "ids": self.ids,
            "thresholds": np.array([self.nll_threshold, self.rec_threshold]),
            "bic": self.bic,
            "groups": self._groups,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> LatentClusterer:
        k = len(a["weights"])
        groups = a.get("groups", np.arange(k))  # versions written before clusters had several components
        n_clusters = int(groups.max()) + 1 if len(groups) else 0
        shapes_ok = (
            a["means"].ndim == 2
            and a["means"].shape[0] == k
            and a["covariances"].shape == (k, a["means"].shape[1], a["means"].shape[1])
            and groups.shape == (k,)
            and set(groups.tolist()) == set(range(n_clusters))
            and a["ids"].shape == (n_clusters,)
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
            groups.astype(np.int64),
        )


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """log Σⱼ exp(a[:, j]), stable; (events, K) → (events,)."""
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]


def _ratio(score: np.ndarray, threshold: float) -> np.ndarray:
    """Score relative to its threshold, shifted so that the threshold maps to 1 whatever the sign of scores."""
    return np.maximum(0.0, 1.0 + (score - threshold) / max(abs(threshold), 1e-12))


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
