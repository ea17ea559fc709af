"""Cluster quality against labels, and the paper's baselines on the same events (DESIGN §5). Pure."""

from __future__ import annotations

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score
from sklearn.mixture import GaussianMixture


def scores(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """ARI and AMI of a clustering against reference labels (any hashable values)."""
    return {
        "ari": float(adjusted_rand_score(labels, predicted)),
        "ami": float(adjusted_mutual_info_score(labels, predicted)),
    }


def gmm_bic(x: np.ndarray, k_max: int = 20, seed: int = 0) -> np.ndarray:
    """Labels of the lowest-BIC full Gaussian mixture with K = 1 … k_max on x (events, dims)."""
    best: tuple[float, GaussianMixture] | None = None
    for k in range(1, min(k_max, len(x)) + 1):
        gm = GaussianMixture(k, random_state=seed).fit(x)
        bic = gm.bic(x)
        if best is None or bic < best[0]:
            best = (bic, gm)
    assert best is not None
    return best[1].predict(x)


def pca_gmm(features: np.ndarray, dims: int, seed: int = 0) -> np.ndarray:
    """Labels of PCA to ``dims`` dimensions, then a full Gaussian mixture with K = 1 … 20 by BIC."""
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return gmm_bic(PCA(n_components=min(dims, *x.shape), random_state=seed).fit_transform(x), seed=seed)


def baselines(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, dict[str, float]]:
    """The paper's baselines on flattened features (events, n_in), K = number of distinct labels.

    hca_ward: Ward hierarchical clustering cut at K; pca_gmm: PCA(2) then a GMM with K by BIC (1–20);
    kmeans: k-means with K (10 restarts).
    """
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    k = len(np.unique(labels))
    ward = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    pca = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return {
        "hca_ward": scores(labels, ward),
        "pca_gmm": scores(labels, gmm_bic(pca, seed=seed)),
        "kmeans": scores(labels, km),
    }
