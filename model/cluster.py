"""Latent clusters (DESIGN §5): fitting the mixture over μ (``model.mixture`` holds the fitted one and aligns
stable IDs). Pure.

Three ways to choose the number of clusters, all up to ``k_max``:

- ``"ward"`` (default): Ward's hierarchy over the standardised latent of a subsample, cut where the mean
  silhouette is highest; each cluster is then modelled by a small full-covariance mixture, so a cluster may be
  elongated or bent. The silhouette finds K without being told. On the latents of the protocol's choose events
  (docs/RESULTS.md) it lifted simulated recordings from ARI 0.51 to 0.72 and the worst paper seed from 0.35 to
  0.42 against the DP consensus. It favours compact groups: thin bands far longer than the gaps between them
  are cut across (on three parallel bands ARI 0.42, the DP mixture 0.77); a VAE latent measured otherwise.
- ``"dp"``: a variational Dirichlet-process mixture (``BayesianGaussianMixture``, truncated at
  ``k_max``) switches off the components the data do not need. On the paper's data it measured better than BIC:
  a VAE latent is not a union of Gaussians, and BIC keeps adding components to fit curved clusters (K = 18–19
  for 11 species), where the DP mixture settles at 9–12 (docs/RESULTS.md).
- ``"bic"``: full-covariance mixtures for K = k_min … k_max, lowest BIC wins (the paper's choice).
- ``"modes"``: the same BIC mixture on the standardised latent, its components joined wherever two make one mode
  (``model.kchoice.modes``); each cluster then modelled as ``"ward"`` models it. On simulated deployments it
  counted species closer than Ward's cut on the tuning seeds and no closer on held-out ones (docs/RESULTS.md).
- ``"density"``: the groups are found in the *features*, not the latent: HDBSCAN on their principal components
  (``model.kchoice.density_groups``), and modelled in the latent as ``"ward"`` models its groups. Where one group
  holds most of the events (more than ``DENSITY_ONE_GROUP``), density found no structure there (species that
  touch, as on the paper's data), and with ``split_silhouette`` set the groups are split again in the latent.
  Needs the training events' features (``fit_clusterer``'s ``features``). A short training's latent merges
  species its features keep apart (5-nearest-neighbour accuracy 0.95–1.00 in the features, 0.70–0.99 in a first
  model's latent, on simulated deployments); the daemon's new models are cut so (docs/RESULTS.md).

Either way the result is stored as a plain mixture (weights, means, covariances), so assigning new events needs
nothing but those arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.cluster.hierarchy
import scipy.spatial.distance
from sklearn.mixture import BayesianGaussianMixture, GaussianMixture

from model.kchoice import (
    DENSITY_DIMS,
    DENSITY_ONE_GROUP,
    PRESENT_FLOOR,
    PRESENT_FROM,
    PRESENT_SHARE,
    active_dims,
    density_groups,
    modes,
    most_agreeing,
    present_min,
    split_further,
    ward_cut,
)
from model.mixture import NOVEL, Assignment, LatentClusterer, align_ids

__all__ = [
    "NOVEL",
    "PRESENT_FLOOR",
    "PRESENT_FROM",
    "PRESENT_SHARE",
    "Assignment",
    "ClusterConfig",
    "LatentClusterer",
    "active_dims",
    "align_ids",
    "cluster_quality",
    "dp_mixture",
    "fit_clusterer",
    "merge_by_labels",
    "most_agreeing",
    "present_min",
]

METHODS = ("ward", "dp", "bic", "modes", "density")


@dataclass(frozen=True)
class ClusterConfig:
    method: str = "ward"
    k_min: int = 1  # bic: K in [k_min, k_max]
    k_max: int = 20  # ward: largest cut tried; dp: truncation level; bic: largest K
    concentration: float = 1e-2  # dp: Dirichlet-process concentration (smaller → fewer clusters)
    min_weight: float = 1e-3  # dp: components below this weight are dropped
    n_init: int = 2
    dp_inits: tuple[str, ...] = ("kmeans", "k-means++", "random_from_data")  # dp: kinds of start
    dp_combine: str = "consensus"  # dp: "consensus" of all fits (see _dp_consensus) or "best_bound"
    dp_restarts: int = 3  # dp consensus: fits per kind of start
    # ward: cut at the largest K whose mean silhouette is within this of the highest (0 = the highest)
    silhouette_tolerance: float = 0.0
    # ward: each group of the cut is split again while its own best cut scores at least this mean silhouette
    # (0 = one cut only; ``_split_further``)
    split_silhouette: float = 0.0
    density_dims: int = DENSITY_DIMS  # density: principal components of the features the groups are found in
    ward_events: int = 4000  # ward, modes: the subsample clustered (Ward's memory grows with its square)
    consensus_events: int = 2000  # dp consensus: subsample on which the fits' agreement is measured
    consensus_cut: float = 0.5  # dp consensus: events together when at least this fraction of fits agree
    group_components: int = 3  # ward, dp consensus: most Gaussian components modelling one cluster
    min_cluster_fraction: float = 0.01  # ward, dp consensus: smaller groups of the subsample are not clusters
    max_fit_events: int = 20_000  # larger sets are subsampled for the fit (seeded)
    novelty_quantile: float = 0.995  # training events above this quantile of either score are "novel"
    merge_min_share: float = 0.25  # with labels: see merge_by_labels
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
        if self.dp_combine not in ("consensus", "best_bound"):
            raise ValueError(f"dp_combine must be consensus or best_bound, got {self.dp_combine!r}")
        if not (0 < self.consensus_cut < 1 and self.dp_restarts >= 1 and self.group_components >= 1):
            raise ValueError(
                f"need 0 < consensus_cut < 1, dp_restarts >= 1 and group_components >= 1, got {self.consensus_cut}, "
                f"{self.dp_restarts} and {self.group_components}"
            )
        if self.consensus_events < 10 or self.ward_events < 10:
            raise ValueError(
                f"consensus_events and ward_events must be >= 10, got {self.consensus_events} and {self.ward_events}"
            )
        if not 1 <= self.k_min <= self.k_max:
            raise ValueError(f"need 1 <= k_min <= k_max, got {self.k_min} and {self.k_max}")
        if not 0 <= self.split_silhouette <= 1:
            raise ValueError(f"split_silhouette must be in [0, 1] (0: one cut), got {self.split_silhouette}")
        if self.split_silhouette > 0 and self.method not in ("ward", "modes", "density"):
            raise ValueError(f"split_silhouette splits the groups of ward, modes and density, not of {self.method}")
        if self.density_dims < 1:
            raise ValueError(f"density_dims must be at least 1, got {self.density_dims}")
        if not 0.5 < self.novelty_quantile <= 1:
            raise ValueError(f"novelty_quantile must be in (0.5, 1], got {self.novelty_quantile}")


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


def merge_by_labels(components: np.ndarray, k: int, labels: np.ndarray, min_share: float) -> np.ndarray:
    """(k,) cluster of each of ``k`` mixture components, from calibration labels of the training events.

    Parameters
    ----------
    components : (events,) component of each training event.
    labels : (events,) species names, "" = unlabelled.
    min_share : a component joins the cluster of the species most of its labelled events belong to when its
        labelled events are at least this share of what the overall labelled fraction predicts; otherwise (no
        labelled events, or too few: an unlabelled species with a few stray neighbours) it is a cluster of its own.

    Returns
    -------
    (k,) int64 cluster indices 0 … n−1, in order of first appearance.
    """
    labelled = labels != ""
    frac = labelled.mean() if len(labels) else 0.0
    keys: list[str] = []
    for j in range(k):
        m = components == j
        names, counts = np.unique(labels[m & labelled], return_counts=True)
        if len(names) and counts.sum() >= min_share * frac * m.sum():
            keys.append("species:" + str(names[np.argmax(counts)]))
        else:
            keys.append(f"component:{j}")
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    return np.array([index[key] for key in keys], dtype=np.int64)


def _largest_first(
    weights: np.ndarray, means: np.ndarray, covariances: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clusters renumbered 0 … k−1 by total weight (0 = largest; IDs start in that order), components sorted by
    cluster, then weight."""
    size = np.zeros(groups.max() + 1)
    np.add.at(size, groups, weights)
    rank = np.argsort(np.argsort(-size, kind="stable"))  # old cluster index → new
    groups = rank[groups]
    order = np.lexsort((-weights, groups))
    return weights[order], means[order], covariances[order], groups[order].astype(np.int64)


def _dp_consensus(
    x: np.ndarray, cfg: ClusterConfig, k_max: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clusters on which restarts of the Dirichlet-process mixture agree, each modelled by a small mixture.

    Variational fits end in local optima, and which one is best by its lower bound is not which one groups
    species best (on the paper data the highest bound came with the lowest ARI on two seeds of three). Every kind
    of start is fitted ``cfg.dp_restarts`` times; two events belong together when most fits put them in one
    component (average linkage of the co-assignment of a subsample, cut at ``cfg.consensus_cut``). A cluster
    found so is often curved, so it is modelled by a full-covariance mixture of up to ``cfg.group_components``
    components chosen by BIC; together they form a mixture whose components are grouped into clusters.

    Returns
    -------
    weights (K,), means (K, latent), covariances (K, latent, latent), groups (K,) cluster of each component.
    """
    sub = x[rng.choice(len(x), min(len(x), cfg.consensus_events), replace=False)]  # (n, latent)
    co = np.zeros((len(sub), len(sub)), dtype=np.float32)  # fraction of fits that put i and j together
    fits = 0
    for r in range(cfg.dp_restarts):
        for init in cfg.dp_inits:
            member = dp_mixture(replace(cfg, seed=cfg.seed * 1000 + r, n_init=1), k_max, init).fit(x)
            lab = member.predict(sub)
            co += lab[:, None] == lab[None, :]
            fits += 1
    co /= fits
    link = scipy.cluster.hierarchy.linkage(scipy.spatial.distance.squareform(1 - co, checks=False), "average")
    lab = scipy.cluster.hierarchy.fcluster(link, 1 - cfg.consensus_cut, "distance") - 1
    return _model_groups(sub, lab, cfg)


def _ward_silhouette(
    x: np.ndarray, cfg: ClusterConfig, k_max: int, rng: np.random.Generator, features: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ward's hierarchy over the standardised latent of a subsample, cut at the K (2 … k_max) of the highest mean
    silhouette (``"modes"``: the modes of a BIC mixture instead; ``"density"``: the density groups of the same
    events' ``features``, events in no group left out); each cluster modelled by a small mixture
    (``_model_groups``).

    The latent is standardised per dimension first (Ward's criterion is a sum of squares, so a dimension with a
    larger spread would otherwise weigh more); the fitted Gaussians are mapped back to the latent's own units.

    Returns
    -------
    weights (K,), means (K, latent), covariances (K, latent, latent), groups (K,) cluster of each component.
    """
    pick = np.arange(len(x)) if len(x) <= cfg.ward_events else rng.choice(len(x), cfg.ward_events, replace=False)
    sub = x[pick]  # (n, latent)
    centre, scale = sub.mean(axis=0), sub.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (sub - centre) / scale
    min_size = max(z.shape[1] + 2, math.ceil(cfg.min_cluster_fraction * len(z)))  # _model_groups' floor
    split = cfg.split_silhouette
    if cfg.method == "density":
        assert features is not None  # fit_clusterer checks
        lab = density_groups(features[pick], min_size, cfg.density_dims)  # at least half the events grouped
        grouped = lab >= 0
        z, lab = z[grouped], np.unique(lab[grouped], return_inverse=True)[1].astype(np.int64)
        if np.bincount(lab).max() <= DENSITY_ONE_GROUP * len(lab):
            split = 0.0  # density found structure: its groups stand; split only one holding most of the events
    elif cfg.method == "modes":
        lab = modes(z, k_max, cfg.seed, cfg.n_init)
    else:
        lab, _ = ward_cut(z, k_max, cfg.silhouette_tolerance)
    if split > 0:
        lab = split_further(z, lab, k_max, split, min_size)
    weights, means, covariances, groups = _model_groups(z, lab, cfg)
    return weights, centre + means * scale, covariances * np.outer(scale, scale)[None], groups


def cluster_quality(mu: np.ndarray, cfg: ClusterConfig) -> float:
    """How well ``mu`` (events, latent) falls into groups, without labels: the mean silhouette of the Ward cut
    ``"ward"`` would choose, on the standardised latent of a seeded subsample of ``cfg.ward_events``.

    Comparable across latents of different trainings or epochs (the silhouette has no units); higher is better.
    NaN (nothing to score) for a latent with no active dimension (``active_dims``): its spread is numerical
    noise, which standardising blows up to unit spread and the silhouette then finds groups in. A first model's
    latent can stay so for tens of epochs after the warm-up; on a simulated deployment the criterion kept such an
    epoch at a silhouette of 0.91, and the model published one cluster for nine species (docs/RESULTS.md).
    """
    x = np.asarray(mu, dtype=np.float64)
    if active_dims(x) == 0:
        return math.nan
    rng = np.random.default_rng(cfg.seed)
    sub = x if len(x) <= cfg.ward_events else x[rng.choice(len(x), cfg.ward_events, replace=False)]
    scale = sub.std(axis=0)
    z = (sub - sub.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    return ward_cut(z, cfg.k_max)[1]


def _model_groups(
    sub: np.ndarray, lab: np.ndarray, cfg: ClusterConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each group of ``sub`` (events, latent) labelled by ``lab`` (events,) as a full-covariance mixture of up to
    ``cfg.group_components`` Gaussians chosen by BIC; groups smaller than ``cfg.min_cluster_fraction`` of the events
    are left out. Returns weights (K,), means, covariances, groups (K,) cluster of each component."""
    sizes = np.bincount(lab)
    # clusters of a few stray events are left out: their events go to the nearest cluster or are novel. A cluster
    # needs more events than the latent has dimensions, or its covariance is singular.
    big = np.flatnonzero(sizes >= max(sub.shape[1] + 2, cfg.min_cluster_fraction * len(sub)))
    if not len(big):  # nothing but stray events (a handful of events, no agreement): one cluster of them all
        lab, sizes, big = np.zeros(len(sub), np.int64), np.array([len(sub)]), np.array([0])
    parts = []
    for c in big:
        pts = sub[lab == c]
        best: tuple[float, GaussianMixture] | None = None
        for k in range(1, cfg.group_components + 1):
            if len(pts) < 20 * k and k > 1:  # too few events for more components of a full covariance
                break
            gm = GaussianMixture(k, covariance_type="full", random_state=cfg.seed, reg_covar=1e-6).fit(pts)
            bic = float(gm.bic(pts))
            if best is None or bic < best[0]:
                best = (bic, gm)
        assert best is not None
        parts.append((sizes[c] * best[1].weights_, best[1].means_, best[1].covariances_))
    weights = np.concatenate([p[0] for p in parts])
    groups = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)]).astype(np.int64)
    means = np.concatenate([p[1] for p in parts])
    covariances = np.concatenate([p[2] for p in parts])
    return weights / weights.sum(), means, covariances, groups


def fit_clusterer(
    mu: np.ndarray,
    rec_error: np.ndarray,
    cfg: ClusterConfig,
    labels: np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> LatentClusterer:
    """Fit a mixture to ``mu`` (events, latent), K chosen by ``cfg.method``; novelty thresholds from the same events.

    With calibration ``labels`` (events,) str ("" = unlabelled), components are grouped into clusters by
    ``merge_by_labels``: what a field user gets from labelling a few insects of the species they know.
    ``features`` (events, …), the same events' model inputs, are what ``"density"`` finds its groups in; the
    other methods do not read them.
    """
    mu = np.asarray(mu, dtype=np.float64)
    if len(mu) < 2:
        raise ValueError(f"need at least 2 events to fit clusters, got {len(mu)}")
    flat: np.ndarray | None = None
    if cfg.method == "density":
        if features is None or len(features) != len(mu):
            got = "none" if features is None else f"{len(features)} rows"
            raise ValueError(f"density finds its groups in the events' features: need {len(mu)} rows, got {got}")
        flat = np.asarray(features).reshape(len(mu), -1)  # density_groups reads its subsample in float64
    rng = np.random.default_rng(cfg.seed)
    pick = np.arange(len(mu)) if len(mu) <= cfg.max_fit_events else rng.choice(len(mu), cfg.max_fit_events, False)
    fit_on = mu[pick]
    k_max = min(cfg.k_max, len(fit_on))
    bics = []
    groups: np.ndarray | None = None
    if cfg.method in ("ward", "modes", "density"):
        weights, means, covariances, groups = _ward_silhouette(
            fit_on, cfg, k_max, rng, None if flat is None else flat[pick]
        )
    elif cfg.method == "dp" and cfg.dp_combine == "consensus":
        weights, means, covariances, groups = _dp_consensus(fit_on, cfg, k_max, rng)
    elif cfg.method == "dp":
        # the fit with the highest lower bound (the model's own criterion: same prior, same events) is kept
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
    if groups is None:
        groups = np.arange(len(weights), dtype=np.int64)
    weights, means, covariances, groups = _largest_first(weights, means, covariances, groups)
    if labels is not None and (np.asarray(labels) != "").any():
        # the clusters' training events, as the mixture assigns them
        plain = LatentClusterer(
            weights, means, covariances, np.arange(groups.max() + 1), 0.0, 0.0, np.empty((0, 2)), groups
        )
        merged = merge_by_labels(
            plain.components(mu), groups.max() + 1, np.asarray(labels).astype(str), cfg.merge_min_share
        )
        weights, means, covariances, groups = _largest_first(weights, means, covariances, merged[groups])
    clusterer = LatentClusterer(
        weights,
        means,
        covariances,
        np.arange(groups.max() + 1, dtype=np.int64),
        0.0,
        0.0,
        np.array(bics, dtype=np.float64).reshape(-1, 2),
        groups,
    )
    q = cfg.novelty_quantile
    clusterer.nll_threshold = float(np.quantile(-clusterer.score_samples(mu), q))
    clusterer.rec_threshold = float(np.quantile(np.asarray(rec_error, np.float64), q))
    return clusterer
