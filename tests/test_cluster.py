import math

import numpy as np
import pytest

from model.cluster import NOVEL, ClusterConfig, LatentClusterer, align_ids, fit_clusterer, most_agreeing


def blobs(seed: int = 0, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    y = rng.integers(0, 3, n)
    return centres[y] + rng.normal(0, 0.5, (n, 2)), y


@pytest.mark.parametrize("method", ["ward", "dp", "bic"])
def test_finds_three_blobs_and_ids_follow_size(method):
    mu, y = blobs()
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method=method, k_max=6))
    assert c.k == 3
    assert np.all(np.diff(c.weights) <= 0) and c.ids.tolist() == [0, 1, 2]
    a = c.assign(mu, np.ones(len(mu)))
    assert (a.cluster >= 0).mean() > 0.98
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, a.cluster) > 0.97
    assert c.bic[:, 0].tolist() == (list(range(1, 7)) if method == "bic" else [])


def arcs(seed: int = 0, n: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """Two thin curved bands, the shape a VAE latent takes: BIC tiles each band with many Gaussians."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    t = rng.uniform(0, np.pi, n)
    r = np.where(y == 0, 3.0, 6.0) + rng.normal(0, 0.1, n)
    return np.c_[r * np.cos(t), r * np.sin(t)], y


def test_dp_mixture_does_not_tile_curved_clusters_like_bic():
    from sklearn.metrics import adjusted_rand_score

    mu, y = arcs()
    dp = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="dp", k_max=20))
    bic = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="bic", k_max=20))
    assert dp.k < bic.k
    score = {m: adjusted_rand_score(y, c.components(mu)) for m, c in (("dp", dp), ("bic", bic))}
    assert score["dp"] > score["bic"]


def test_cluster_config_refuses_unknown_method():
    with pytest.raises(ValueError, match="method"):
        ClusterConfig(method="kmeans")


def test_far_points_and_bad_reconstructions_are_novel():
    mu, _ = blobs()
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=4))
    a = c.assign(np.array([[40.0, 40.0], [4.0, 0.0], [4.0, 0.0]]), np.array([1.0, 1.0, 50.0]))
    assert a.cluster[0] == NOVEL and a.novelty[0] > 1
    assert a.cluster[1] >= 0 and a.novelty[1] <= 1
    assert a.cluster[2] == NOVEL  # well placed, but reconstructed far worse than anything in training


def test_round_trip_through_arrays():
    mu, _ = blobs(1)
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=4))
    again = LatentClusterer.from_arrays(c.to_arrays())
    a, b = c.assign(mu), again.assign(mu)
    np.testing.assert_array_equal(a.cluster, b.cluster)
    np.testing.assert_allclose(a.probability, b.probability)
    bad = c.to_arrays()
    bad["means"] = bad["means"][:1]
    with pytest.raises(ValueError, match="inconsistent"):
        LatentClusterer.from_arrays(bad)


def test_alignment_keeps_ids_and_gives_fresh_ones():
    old = np.array([5, 5, 5, 7, 7, 9, 9, NOVEL])
    new = np.array([1, 1, 1, 0, 0, 2, 2, 3])  # same groups, new numbering, plus one new component
    assert align_ids(old, new, n_new=4, next_id=10).tolist() == [7, 5, 9, 10]


def test_alignment_solves_the_assignment_not_greedy():
    # greedy on the biggest overlap would give component 0 → 1 and leave component 1 without a match
    old = np.array([1] * 5 + [2] * 4 + [1] * 4)
    new = np.array([0] * 5 + [0] * 4 + [1] * 4)
    assert align_ids(old, new, n_new=2, next_id=3).tolist() == [2, 1]


def test_retrain_on_same_data_keeps_ids():
    mu, _ = blobs(2)
    first = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=5, seed=0))
    second = fit_clusterer(mu[:, ::-1] * 2, np.ones(len(mu)), ClusterConfig(k_max=5, seed=1))  # another latent
    old_ids = first.assign(mu).cluster
    second.ids = align_ids(old_ids, second.components(mu[:, ::-1] * 2), second.k, next_id=first.k)
    np.testing.assert_array_equal(second.assign(mu[:, ::-1] * 2).cluster, old_ids)


def test_assignment_equals_sklearns_gaussian_mixture():
    # the serving path computes the mixture's log-densities itself; sklearn's GaussianMixture is the known answer
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(7)
    mu = np.concatenate([rng.normal(m, s, (200, 3)) for m, s in ((-3, 0.5), (0, 1.0), (4, 0.3))])
    gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(mu)
    c = LatentClusterer(gm.weights_, gm.means_, gm.covariances_, np.array([5, 9, 2]), 5.0, 1.0, np.empty((0, 2)))
    x = np.concatenate([mu[::7], rng.normal(0, 6, (20, 3))])
    np.testing.assert_allclose(c.score_samples(x), gm.score_samples(x), rtol=1e-10)
    np.testing.assert_array_equal(c.components(x), gm.predict(x))
    a = c.assign(x)
    np.testing.assert_allclose(a.probability, gm.predict_proba(x).max(axis=1), rtol=1e-10)
    novel = -gm.score_samples(x) > 5.0
    assert novel.any() and not novel.all()
    np.testing.assert_array_equal(a.cluster, np.where(novel, NOVEL, np.array([5, 9, 2])[gm.predict(x)]))


def test_dp_keeps_the_start_with_the_highest_lower_bound():
    from dataclasses import replace

    from model.cluster import dp_mixture

    mu, _ = arcs(seed=3, n=900)
    cfg = ClusterConfig(k_max=12, dp_combine="best_bound")
    chosen = fit_clusterer(mu, np.ones(len(mu)), cfg)
    bounds = {}
    for init in cfg.dp_inits:
        one = fit_clusterer(mu, np.ones(len(mu)), replace(cfg, dp_inits=(init,)))
        bounds[init] = (dp_mixture(cfg, 12, init).fit(mu).lower_bound_, one)
    best = max(bounds.values(), key=lambda b: b[0])[1]
    np.testing.assert_array_equal(chosen.means, best.means)
    with pytest.raises(ValueError, match="dp_inits"):
        ClusterConfig(dp_inits=("spectral",))


def test_merge_by_labels_known_answer():
    from model.cluster import merge_by_labels

    comp = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3])
    labels = np.array(["a", "a", "", "", "a", "b", "", "", "", "", "", "", "b", "", "", "b"])
    # 0 and 1 are mostly "a"; 2 has no labels (a species nobody labelled); 3 is "b"
    assert merge_by_labels(comp, 4, labels, 0.25).tolist() == [0, 0, 1, 2]
    # a component whose labelled share is far below the overall one keeps its own cluster
    sparse = np.array(["a"] + [""] * 11 + ["b"] * 4)
    assert merge_by_labels(comp, 4, sparse, 0.5).tolist() == [0, 1, 2, 3]


def test_labels_join_the_components_of_a_curved_species():
    # Two thin arcs: the mixture needs several Gaussians per arc. With 10 % of the events labelled, the
    # components of each arc become one cluster, and serving assigns events to the arc, not to a tile.
    from sklearn.metrics import adjusted_rand_score

    mu, y = arcs(seed=1, n=2000)
    labels = np.where(np.random.default_rng(0).random(len(y)) < 0.1, np.array(["inner", "outer"])[y], "")
    plain = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="bic", k_max=12))
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="bic", k_max=12), labels)
    assert plain.k > 2 and len(c.weights) == plain.k and c.k == 2
    assert sorted(set(c.groups.tolist())) == [0, 1] and c.ids.tolist() == [0, 1]
    a = c.assign(mu)
    assert adjusted_rand_score(y[a.cluster >= 0], a.cluster[a.cluster >= 0]) > 0.99
    # the cluster's probability is the sum over its components: near 1 away from the arcs' ends
    assert np.median(a.probability) > 0.99
    assert adjusted_rand_score(y, c.components(mu)) > 0.99
    back = LatentClusterer.from_arrays(c.to_arrays())
    np.testing.assert_array_equal(back.assign(mu).cluster, a.cluster)
    np.testing.assert_allclose(back.cluster_means[0], mu[c.components(mu) == 0].mean(axis=0), atol=0.3)


def test_clusterer_arrays_without_groups_still_load():
    # model versions written before clusters could hold several components
    mu, _ = blobs()
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=6))
    arrays = c.to_arrays()
    del arrays["groups"]
    old = LatentClusterer.from_arrays(arrays)
    assert old.groups.tolist() == list(range(old.k))
    np.testing.assert_array_equal(old.assign(mu).cluster, c.assign(mu).cluster)
    arrays["groups"] = np.array([0, 0, 2])  # a cluster index with no component
    with pytest.raises(ValueError, match="shapes"):
        LatentClusterer.from_arrays(arrays)


def test_dp_consensus_clusters_are_pure_and_modelled_by_few_components():
    # Restarts of the DP mixture disagree on where to cut each arc; the clusters they agree on stay inside one arc
    mu, y = arcs(seed=2, n=1500)
    cfg = ClusterConfig(k_max=12)
    c = fit_clusterer(mu, np.ones(len(mu)), cfg)
    comp = c.components(mu)
    for cluster in range(c.k):
        inside = y[comp == cluster]
        assert len(inside) >= cfg.min_cluster_fraction * len(mu) / 2
        assert max(np.mean(inside == 0), np.mean(inside == 1)) > 0.99
    counts = np.bincount(c.groups, minlength=c.k)
    assert counts.min() >= 1 and counts.max() <= cfg.group_components
    for bad in ({"dp_combine": "vote"}, {"consensus_cut": 1.0}, {"dp_restarts": 0}, {"consensus_events": 5}):
        with pytest.raises(ValueError):
            ClusterConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [16, 40])
def test_a_handful_of_events_still_gets_clusters(n):
    # the daemon trains from 16 events on
    mu = np.random.default_rng(n).normal(0, 1, (n, 4))
    c = fit_clusterer(mu, np.ones(n), ClusterConfig())
    a = c.assign(mu, np.ones(n))
    assert c.k >= 1 and len(a.cluster) == n and np.isfinite(a.probability).all()


def test_ward_cuts_where_the_silhouette_is_highest_and_reports_in_the_latents_units():
    """The known answer: scikit-learn's Ward and silhouette on the standardised events, K = 2 … k_max. The latent's
    dimensions differ in scale by 10⁶; the fitted clusters' means come back in the latent's own units."""
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    rng = np.random.default_rng(4)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0], [0.0, -5.0], [6.0, 6.0]])
    y = rng.integers(0, 5, 600)
    mu = (centres[y] + rng.normal(0, 1.2, (600, 2))) * np.array([1000.0, 0.001])
    z = (mu - mu.mean(axis=0)) / mu.std(axis=0)
    sil = {
        k: silhouette_score(z, AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(z))
        for k in range(2, 9)
    }
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="ward", k_max=8))
    assert c.k == max(sil, key=sil.get) == 5
    assert adjusted_rand_score(y, c.components(mu)) > 0.9
    found = c.cluster_means[np.argsort(c.cluster_means[:, 0] + 1e6 * c.cluster_means[:, 1])]
    want = centres * np.array([1000.0, 0.001])
    want = want[np.argsort(want[:, 0] + 1e6 * want[:, 1])]
    np.testing.assert_allclose(found / np.array([1000.0, 0.001]), want / np.array([1000.0, 0.001]), atol=0.4)


def test_ward_subsamples_large_sets_and_a_tiny_set_is_one_cluster():
    mu, y = blobs(3, n=900)
    c = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(method="ward", ward_events=200, seed=1))
    from sklearn.metrics import adjusted_rand_score

    assert c.k == 3 and adjusted_rand_score(y, c.components(mu)) > 0.97
    two = fit_clusterer(mu[:2], np.ones(2), ClusterConfig(method="ward"))
    assert two.k == 1 and (two.assign(mu[:2]).cluster == 0).all()
    with pytest.raises(ValueError, match="ward_events"):
        ClusterConfig(ward_events=5)


def test_the_split_is_a_silhouette_and_only_for_ward_modes_and_density():
    assert ClusterConfig(method="modes", split_silhouette=1.0).split_silhouette == 1.0
    assert ClusterConfig(method="density", split_silhouette=0.65).split_silhouette == 0.65
    with pytest.raises(ValueError, match="density_dims"):
        ClusterConfig(method="density", density_dims=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="split_silhouette must be in"):
            ClusterConfig(split_silhouette=bad)
    for method in ("dp", "bic"):  # their clusters are a mixture's components: nothing splits them again
        with pytest.raises(ValueError, match=f"not of {method}"):
            ClusterConfig(method=method, split_silhouette=0.65)
        assert ClusterConfig(method=method).split_silhouette == 0.0


def test_most_agreeing_partition_known_answer():
    a = np.array([0, 0, 0, 1, 1, 1])
    b = np.array([5, 5, 5, 7, 7, 7])  # a relabelled: ARI 1
    c = np.array([0, 1, 0, 1, 0, 1])  # against a: contingency [[2, 1], [1, 2]], ARI (2 − 2.4) / (6 − 2.4) = −1/9
    kept, mean = most_agreeing([c, a, b])
    assert kept == 1  # a and b tie at (1 − 1/9) / 2; the first wins
    assert mean == pytest.approx([-1 / 9, 4 / 9, 4 / 9])
    kept, mean = most_agreeing([a])
    assert kept == 0 and mean.tolist() == [1.0]
    with pytest.raises(ValueError, match="same events"):
        most_agreeing([a, a[:5]])
    with pytest.raises(ValueError, match="at least one"):
        most_agreeing([])


def test_present_min_counts_a_cluster_only_beyond_stray_events():
    from model.cluster import PRESENT_FLOOR, PRESENT_FROM, PRESENT_SHARE, present_min

    assert (PRESENT_FLOOR, PRESENT_SHARE, PRESENT_FROM) == (2, 0.005, 50)
    assert present_min(10) == present_min(49) == 1  # a quiet window: every cluster with an event counts
    assert present_min(50) == 2  # the floor: one stray event among 50 is not a species
    assert present_min(400) == 2
    assert present_min(401) == 3  # 0.5 % of 401 = 2.005, rounded up
    assert present_min(4000) == 20
    assert present_min(100, share=0.05, floor=1) == 5
    assert present_min(20, start=10) == 2


def test_a_window_counts_the_clusters_present_and_estimates_from_every_count():
    """``window_summary``: observed Hill numbers of the clusters holding at least ``present_min(n)`` events, the
    others' events as ``stray``; the estimates, intervals and coverage read every count (Chao1 needs the
    singletons), and the q0 interval reaches down to the clusters present."""
    from model.diversity import present, summarise, window_summary

    counts = [100, 50, 1, 1]  # 152 events: a cluster needs 2
    assert present(counts).tolist() == [100, 50]
    w = window_summary(counts, seed=3)
    p = np.array([100, 50]) / 150
    assert w["observed"]["q0"] == 2 and w["stray"] == 2
    assert w["observed"]["q1"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert w["observed"]["q2"] == pytest.approx(1 / (p**2).sum())
    full = summarise(counts, seed=3).to_dict()
    assert {k: w[k] for k in ("estimated", "coverage")} == {k: full[k] for k in ("estimated", "coverage")}
    # the q0 interval reaches down to the 2 clusters present (the bootstrap's is clipped at the 4 with events)
    assert full["ci95"]["q0"][0] >= 4 and w["ci95"]["q0"] == [2.0, full["ci95"]["q0"][1]]
    assert w["ci95"]["q1"] == full["ci95"]["q1"] and w["ci95"]["q2"] == full["ci95"]["q2"]
    assert w["estimated"]["q0"] == pytest.approx(4 + 2 * 1 / 2 * (151 / 152))  # Chao1: f1 = 2, f2 = 0
    assert w["estimated"]["q0"] >= w["observed"]["q0"]
    quiet = window_summary([1, 1, 1])  # 3 events: every cluster counts
    assert quiet["observed"]["q0"] == 3 and quiet["stray"] == 0


def test_cluster_quality_is_higher_for_separated_groups():
    from model.cluster import cluster_quality

    mu, _ = blobs()
    rng = np.random.default_rng(1)
    one = rng.normal(0, 1, (300, 2))
    cfg = ClusterConfig(k_max=6)
    separated, blob = cluster_quality(mu, cfg), cluster_quality(one, cfg)
    assert separated > 0.7 and blob < 0.5 and separated > blob
    # no units: the same groups, scaled, score the same
    assert cluster_quality(mu * 40.0, cfg) == pytest.approx(separated)
    # … down to a latent with no active dimension (variance of each mean ≤ 0.01 against the prior's 1): numerical
    # noise, which standardised would score as well as the groups it came from
    from model.cluster import active_dims

    assert active_dims(mu) == 2 and active_dims(mu * 0.005) == 0 and active_dims(np.c_[mu[:, :1], mu[:, 1] * 1e-3]) == 1
    assert math.isnan(cluster_quality(mu * 0.005, cfg)) and cluster_quality(mu * 0.05, cfg) == pytest.approx(separated)


def test_training_can_keep_the_epoch_whose_latent_clusters_best():
    import torch

    from model.beta import BetaConfig
    from model.cluster import cluster_quality
    from model.train import TrainConfig, encode_mu, fit
    from model.vae import VAE, VAEConfig

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    bins = np.arange(40)
    x = np.exp(-0.5 * ((bins[None, :] - (8 + 12 * y[:, None])) / 2.0) ** 2) + rng.normal(0, 0.05, (240, 40))
    xt = torch.from_numpy(((x - x.min(1, keepdims=True)) / np.ptp(x, 1, keepdims=True)).astype(np.float32))
    cfg = TrainConfig(
        epochs=40, batch_size=32, beta=BetaConfig(warmup=5), select="cluster", select_every=10, select_events=120
    )
    torch.manual_seed(0)
    model = VAE(VAEConfig(n_in=40))
    seen: dict[int, np.ndarray] = {}

    def on_epoch(s) -> None:
        seen[s.epoch] = encode_mu(model, xt)[0].double().numpy()

    r = fit(model, xt, cfg, on_epoch=on_epoch)  # 24 held out: too few for the ELBO, not needed here
    train = r.val_index.numpy()
    train = np.setdiff1d(np.arange(240), train)
    # scored on the same seeded subsample of 120 of the 216 training events at every candidate
    sub = ClusterConfig(seed=0, ward_events=120)
    quality = {e: cluster_quality(seen[e][train], sub) for e in (9, 19, 29, 39)}
    # the first epochs' latent has not opened yet (variances ~1e-6): no candidate, whatever its noise scores
    assert math.isnan(quality[9]) and seen[9].var(axis=0).max() < 1e-4
    candidates = {e: q for e, q in quality.items() if not math.isnan(q)}
    assert len(candidates) >= 2 and r.selected_epoch == max(candidates, key=candidates.get)
    assert np.allclose(encode_mu(model, xt)[0].double().numpy(), seen[r.selected_epoch], atol=1e-6)
    # the score is the subsample's, not the whole set's (which differs here)
    from model.train import _cluster_score

    whole = cluster_quality(seen[39][train], ClusterConfig(seed=0))
    score = _cluster_score(model, xt[torch.from_numpy(train)], cfg, 39, 40)
    assert r.selected_epoch == 39 and score == pytest.approx(-quality[39]) and abs(whole - quality[39]) > 1e-3
    with pytest.raises(ValueError, match="select_every"):
        TrainConfig(select="cluster", select_every=0)
    with pytest.raises(ValueError, match="select_events"):
        TrainConfig(select="cluster", select_events=5)


def test_groups_of_a_cut_are_split_again_when_they_hold_structure():
    # two families far apart, each of three species close together: one cut finds the families
    rng = np.random.default_rng(0)
    triangle = np.array([[0.0, 0], [3, 0], [1.5, 2.6]])
    centres = np.r_[triangle - 30, triangle + 30]
    y = rng.integers(0, 6, 1200)
    mu = centres[y] + rng.normal(0, 0.35, (1200, 2))
    from sklearn.metrics import adjusted_rand_score

    once = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=10))
    split = fit_clusterer(mu, np.ones(len(mu)), ClusterConfig(k_max=10, split_silhouette=0.5))
    assert once.k == 2 and split.k == 6
    assert adjusted_rand_score(y, split.assign(mu).cluster) > 0.95
    # a single blob holds no structure worth a split
    blob = fit_clusterer(rng.normal(0, 1, (600, 2)), np.ones(600), ClusterConfig(k_max=10, split_silhouette=0.5))
    assert blob.k <= 3


def test_one_mode_parts_two_gaussians_exactly_where_theory_does():
    # two equal, equally weighted Gaussians of variance σ² make one mode up to a distance of 2σ between the means
    from model.kchoice import one_mode

    w, cov = np.array([0.5, 0.5]), np.ones((2, 1, 1))
    assert one_mode(w, np.array([[0.0], [1.9]]), cov)
    assert not one_mode(w, np.array([[0.0], [2.2]]), cov)
    # in several dimensions only the distance along the line counts, in units of the spread along it
    cov3 = np.stack([np.diag([4.0, 1.0, 1.0])] * 2)
    assert one_mode(w, np.array([[0.0, 0, 0], [3.8, 0, 0]]), cov3)  # σ = 2 along x: 3.8 < 2σ
    assert not one_mode(w, np.array([[0.0, 0, 0], [0, 2.4, 0]]), cov3)  # σ = 1 along y: 2.4 > 2σ
    # a small component on the shoulder of a large one adds no mode of its own
    assert one_mode(np.array([0.95, 0.05]), np.array([[0.0], [1.5]]), cov)


def test_modes_count_groups_not_the_gaussians_that_tile_them():
    from sklearn.metrics import adjusted_rand_score
    from sklearn.mixture import GaussianMixture

    from model.kchoice import modes

    rng = np.random.default_rng(3)
    # one skewed group: BIC needs several Gaussians for it, and they make one mode
    skewed = np.c_[rng.lognormal(0, 0.6, 800), rng.normal(0, 0.3, 800)]
    bic_k = min(range(1, 7), key=lambda k: GaussianMixture(k, random_state=0).fit(skewed).bic(skewed))
    assert bic_k >= 2
    assert len(np.unique(modes(skewed, 10, seed=0))) == 1
    # three groups with valleys between them, one of them skewed
    y = np.repeat([0, 1, 2], 400)
    x = np.r_[skewed[:400] + np.array([0, 8]), rng.normal([0, 0], 0.5, (400, 2)), rng.normal([6, 0], 0.5, (400, 2))]
    lab = modes(x, 10, seed=0)
    assert len(np.unique(lab)) == 3 and adjusted_rand_score(y, lab) > 0.97
    # as a clusterer: the same groups, assigned from the stored mixture alone
    cl = fit_clusterer(x, np.ones(len(x)), ClusterConfig(method="modes", k_max=10))
    assert cl.k == 3 and adjusted_rand_score(y, cl.assign(x).cluster) > 0.97
    # one round blob stays one cluster
    assert len(np.unique(modes(rng.normal(0, 1, (600, 4)), 10, seed=0))) == 1


def _moons(n: int, seed: int, dims: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half-moons (sklearn's), in the first two of ``dims`` values, small noise in the rest."""
    from sklearn.datasets import make_moons

    xy, y = make_moons(n, noise=0.06, random_state=seed)
    rng = np.random.default_rng(seed)
    return np.c_[xy, rng.normal(0, 0.02, (n, dims - 2))], y


def test_density_groups_follow_bent_bands_that_ward_cuts_across():
    from sklearn.metrics import adjusted_rand_score

    from model.kchoice import density_groups, ward_cut

    x, y = _moons(600, 0)
    lab = density_groups(x, min_size=6)
    grouped = lab >= 0
    assert len(np.unique(lab[grouped])) == 2 and grouped.mean() > 0.9
    assert adjusted_rand_score(y[grouped], lab[grouped]) > 0.98
    # Ward's best-silhouette cut of the same points cuts across the moons
    z = (x[:, :2] - x[:, :2].mean(0)) / x[:, :2].std(0)
    assert adjusted_rand_score(y, ward_cut(z, 10)[0]) < 0.6
    np.testing.assert_array_equal(density_groups(x, min_size=6), lab)  # no random start
    # a structureless cloud leaves most events in no group (a few dense specks): it is one group; so are too few
    # events for two groups
    np.testing.assert_array_equal(density_groups(np.random.default_rng(1).normal(0, 1, (600, 30)), 6), np.zeros(600))
    np.testing.assert_array_equal(density_groups(x[:10], min_size=6), np.zeros(10, np.int64))
    with pytest.raises(ValueError, match="min_size"):
        density_groups(x, min_size=1)


def test_density_clusters_come_from_the_features_and_serve_from_the_latent():
    from sklearn.metrics import adjusted_rand_score

    x, y = _moons(800, 2)
    # a latent that merges the two moons into one round cloud, and keeps a trace of them along one axis
    rng = np.random.default_rng(3)
    mu = np.c_[rng.normal(0, 1, 800) + 6.0 * y, rng.normal(0, 1, 800)]
    ward = fit_clusterer(mu, np.ones(800), ClusterConfig(k_max=10))
    dens = fit_clusterer(mu, np.ones(800), ClusterConfig(method="density", k_max=10), features=x)
    assert dens.k == 2
    assert adjusted_rand_score(y, dens.assign(mu).cluster) > 0.9
    assert adjusted_rand_score(y, dens.assign(mu).cluster) >= adjusted_rand_score(y, ward.assign(mu).cluster)
    for bad, says in ((None, "got none"), (x[:10], "got 10 rows")):
        with pytest.raises(ValueError, match=says):
            fit_clusterer(mu, np.ones(800), ClusterConfig(method="density"), features=bad)


def test_density_groups_are_split_again_only_where_density_found_no_structure():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(4)
    # a latent of three clear blobs
    y = rng.integers(0, 3, 900)
    mu = np.array([[0.0, 0], [8, 0], [4, 7]])[y] + rng.normal(0, 0.5, (900, 2))
    cfg = ClusterConfig(method="density", split_silhouette=0.65, k_max=10)
    # features with no gap: one group holds every event, so the latent's structure parts it
    blob = rng.normal(0, 1, (900, 30))
    split = fit_clusterer(mu, np.ones(900), cfg, features=blob)
    assert split.k == 3 and adjusted_rand_score(y, split.assign(mu).cluster) > 0.95
    # features with two groups, neither holding most events: density's groups stand, unsplit
    x, _ = _moons(900, 5)
    kept = fit_clusterer(mu, np.ones(900), cfg, features=x)
    assert kept.k == 2
