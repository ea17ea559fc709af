"""Choosing and counting clusters without labels (used by ``model.cluster``): which latent dimensions are in
use, the partition most like the others, Ward cuts scored by the mean silhouette, splitting a cut's groups
further, the modes of a BIC mixture, groups of events by density in their features, and when a cluster counts
as present in a window. Pure."""

from __future__ import annotations

import math

import numpy as np
import scipy.cluster.hierarchy
import scipy.sparse
import scipy.sparse.csgraph
import scipy.stats
import sklearn.metrics
from sklearn.cluster import HDBSCAN
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

PRESENT_SHARE = 0.005  # present_min: share of a window's events a cluster needs to count as present
PRESENT_FLOOR = 2  # … and never fewer events than this
PRESENT_FROM = 50  # … in windows of at least this many events; in smaller ones every cluster with an event counts
ACTIVE_VARIANCE = 0.01  # active_dims: variance over the events of a dimension's mean, against the prior's 1
DENSITY_DIMS = 20  # density_groups: principal components of the features the density is read in
DENSITY_GROUPED = 0.5  # density_groups: below this share of events in groups, the events are one group
DENSITY_ONE_GROUP = 0.5  # model.cluster's "density": a group holding more of the events is split again
RIDGE_POINTS = 41  # one_mode: points on the segment between two components' means where their density is read


def active_dims(mu: np.ndarray) -> int:
    """Latent dimensions in use: those whose mean varies over the events by more than ``ACTIVE_VARIANCE``
    (Burda, Grosse & Salakhutdinov 2016, "active units"), in the latent's own units, where the prior is N(0, 1)."""
    x = np.asarray(mu, dtype=np.float64)
    return int((x.var(axis=0) > ACTIVE_VARIANCE).sum()) if len(x) > 1 else 0


def ward_cut(z: np.ndarray, k_max: int, tolerance: float = 0.0) -> tuple[np.ndarray, float]:
    """Ward's hierarchy over ``z`` (events, dims) cut at the K (2 … k_max) of the highest mean silhouette, or at
    the largest K whose silhouette is within ``tolerance`` of it: the labels (events,) and the highest silhouette
    (−1 when no cut into two or more groups exists)."""
    top = min(k_max, len(z) - 1)
    cuts: list[tuple[float, np.ndarray]] = []
    if top >= 2:
        link = scipy.cluster.hierarchy.linkage(z, "ward")
        dist = sklearn.metrics.pairwise_distances(z)  # (n, n), once for every cut's silhouette
        for k in range(2, top + 1):
            cut = scipy.cluster.hierarchy.fcluster(link, k, "maxclust") - 1
            if len(np.unique(cut)) < 2:
                continue
            cuts.append((float(sklearn.metrics.silhouette_score(dist, cut, metric="precomputed")), cut))
    if not cuts:
        return np.zeros(len(z), np.int64), -1.0
    best = max(score for score, _ in cuts)
    # cuts come in order of K: the last one close enough to the best is the finest
    return [cut for score, cut in cuts if score >= best - tolerance][-1], best


def split_further(z: np.ndarray, lab: np.ndarray, k_max: int, threshold: float, min_size: int) -> np.ndarray:
    """Split the groups of a cut (``lab`` over ``z``, events × dims) again while one of them has structure of its
    own: its events, standardised afresh, cut by ``ward_cut`` with a mean silhouette of at least
    ``threshold``, and no part smaller than ``min_size`` events (outliers split off score high). At most
    ``k_max`` groups in all.

    The silhouette of one cut of everything finds the coarsest structure: on a latent where species come in a
    few families, a cut between the families scores best, and species within a family are never separated.
    Asked of each group on its own, the same question finds them. Kaufman & Rousseeuw (1990) read a mean
    silhouette above 0.5 as reasonable structure and above 0.7 as strong.
    """
    lab = lab.copy()
    queue = list(np.unique(lab))
    while queue and len(np.unique(lab)) < k_max:
        c = queue.pop(0)
        idx = np.flatnonzero(lab == c)
        if len(idx) < 2 * min_size:
            continue
        g = z[idx]
        sd = g.std(axis=0)
        part, score = ward_cut((g - g.mean(axis=0)) / np.where(sd > 0, sd, 1.0), k_max - len(np.unique(lab)) + 1)
        if score < threshold or np.bincount(part).min() < min_size:
            continue
        fresh = lab.max() + 1
        for j in range(1, part.max() + 1):
            lab[idx[part == j]] = fresh + j - 1
            queue.append(fresh + j - 1)
        queue.append(c)
    return lab


def one_mode(weights: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> bool:
    """Whether two weighted Gaussians (weights (2,), means (2, d), covariances (2, d, d)) make one mode: their
    density read along the segment between the means has no dip, no point lower than the highest point on
    either side of it. A straight-line reading of Hennig's (2010) ridgeline criterion for merging components."""
    t = np.linspace(0.0, 1.0, RIDGE_POINTS)[:, None]
    line = means[0] * (1 - t) + means[1] * t
    parts = zip(weights, means, covariances, strict=True)
    density = sum(w * scipy.stats.multivariate_normal.pdf(line, m, c) for w, m, c in parts)
    # a dip: a point below the highest point on its left and the highest on its right
    rim = np.minimum(np.maximum.accumulate(density), np.maximum.accumulate(density[::-1])[::-1])
    return bool((density >= (1 - 1e-9) * rim).all())


def modes(z: np.ndarray, k_max: int, seed: int, n_init: int = 2) -> np.ndarray:
    """The clusters of ``z`` (events, dims) as the modes of a mixture: full-covariance Gaussian mixtures for K = 1 …
    ``k_max``, the lowest BIC kept, then components joined wherever two of them make one mode (``one_mode``), and
    joined groups taken whole (connected components). Labels (events,) 0 … k−1.

    BIC finds how many Gaussians the density needs, not how many groups it has: a bent or skewed group takes
    several. A group is a mode; two groups are told apart by a valley between them, which is a question about
    the density the mixture already describes (Hennig 2010, Baudry et al. 2010), not a threshold on a score.
    """
    top = max(1, min(k_max, len(z) // (z.shape[1] + 2)))  # a full covariance needs more events than dimensions
    fits = [
        GaussianMixture(k, covariance_type="full", n_init=n_init, random_state=seed, reg_covar=1e-6).fit(z)
        for k in range(1, top + 1)
    ]
    gm = min(fits, key=lambda f: float(f.bic(z)))
    k = gm.n_components
    joined = np.zeros((k, k), dtype=bool)
    for i in range(k):
        for j in range(i + 1, k):
            pair = [i, j]
            joined[i, j] = one_mode(gm.weights_[pair], gm.means_[pair], gm.covariances_[pair])
    _, group = scipy.sparse.csgraph.connected_components(scipy.sparse.csr_matrix(joined), directed=False)
    return np.unique(group[gm.predict(z)], return_inverse=True)[1].astype(np.int64)


def density_groups(features: np.ndarray, min_size: int, dims: int = DENSITY_DIMS) -> np.ndarray:
    """Groups of events by the density of their features (events, values): HDBSCAN (Campello, Moulavi & Sander
    2013) on the first ``dims`` principal components, each group at least ``min_size`` events, chosen by excess of
    mass. Labels (events,) 0 … k−1, and −1 for events in no group (in the sparse space between groups); when
    fewer than ``DENSITY_GROUPED`` of the events are in groups, every event is in one.

    A species' spectra lie on a bent, uneven band (wing-beat frequency, body size and angle vary within it); what
    parts two species is a gap in density, which neither a sum of squares (Ward) nor a Gaussian per group (BIC)
    measures. Where the groups touch with no gap between them, the density has one broad mode: excess of mass
    then keeps most events in one group, which ``split_further`` can still part (``model.cluster``'s
    ``"density"``). Deterministic: no random start.
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if min_size < 2:
        raise ValueError(f"min_size must be at least 2, got {min_size}")
    if len(x) < 2 * min_size:
        return np.zeros(len(x), np.int64)  # too few events for two groups: one
    k = min(dims, x.shape[1], len(x) - 1)
    z = PCA(k, svd_solver="full").fit_transform(x) if k < x.shape[1] else x - x.mean(axis=0)
    lab = HDBSCAN(min_cluster_size=min_size, copy=True).fit(z).labels_.astype(np.int64)
    # most events in no group: the density has no groups to speak of (a structureless cloud leaves a few dense
    # specks of noise as "groups"), so it is one group
    return lab if (lab >= 0).mean() >= DENSITY_GROUPED else np.zeros(len(x), np.int64)


def most_agreeing(partitions: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """The partition that agrees best with the others: the highest mean adjusted Rand index against the rest.

    Parameters
    ----------
    partitions : each (events,) the clusters one training gives the same events (novel events, −1, are a group).

    Returns
    -------
    The index of that partition (the first on a tie) and (partitions,) each one's mean ARI against the others
    (1.0 for a single partition).
    """
    n = len(partitions)
    if n == 0:
        raise ValueError("need at least one partition")
    if len({len(p) for p in partitions}) != 1:
        raise ValueError(f"partitions must cover the same events, got lengths {[len(p) for p in partitions]}")
    agree = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            agree[i, j] = agree[j, i] = sklearn.metrics.adjusted_rand_score(partitions[i], partitions[j])
    mean = (agree.sum(axis=1) - 1) / (n - 1) if n > 1 else np.ones(1)
    return int(np.argmax(mean)), mean


def present_min(
    n_events: int, share: float = PRESENT_SHARE, floor: int = PRESENT_FLOOR, start: int = PRESENT_FROM
) -> int:
    """Events a cluster needs in a window of ``n_events`` to count as present there (the observed Hill numbers).

    A misassigned event lands in some other cluster, so on a day when a species is absent its cluster still
    collects stray events of its neighbours, in proportion to the window's size; one or two such events are
    not evidence that the species flew. A cluster counts when it holds at least ``floor`` events and at least
    ``share`` of the window's events (rounded up). Below ``start`` events (a quiet hour) strays are few and one
    event is a large share of the window: every cluster with an event counts.
    """
    return 1 if n_events < start else max(floor, math.ceil(share * n_events))
