import numpy as np
import pytest
import torch

from model import losses
from model.beta import BetaConfig, GammaConfig
from model.build import build
from model.cluster import ClusterConfig
from model.evaluate import scores
from model.train import MIN_STEPS, TrainConfig, batch_size_for, encode_mu, fit, restarts_for
from model.vae import VAE, VAEConfig


def toy(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three spectral shapes (peaks at different bins) with noise, features in [0, 1]."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    bins = np.arange(40)
    x = np.exp(-0.5 * ((bins[None, :] - (8 + 12 * y[:, None])) / 2.0) ** 2) + rng.normal(0, 0.05, (n, 40))
    x = (x - x.min(1, keepdims=True)) / np.ptp(x, 1, keepdims=True)
    return x[:, None, :].astype(np.float32), np.array(["a", "b", "c"])[y]


CFG = TrainConfig(epochs=60, batch_size=64, beta=BetaConfig(warmup=10, interval=5))


def test_same_seed_same_model_and_scores():
    x, y = toy()
    runs = [build(x, y, VAEConfig(n_in=40), CFG, ClusterConfig(k_max=5), torch.device("cpu")) for _ in range(2)]
    for k, t in runs[0].model.state_dict().items():
        assert torch.equal(t, runs[1].model.state_dict()[k]), k
    assert runs[0].manifest["metrics"] == runs[1].manifest["metrics"]
    other = build(
        x,
        y,
        VAEConfig(n_in=40),
        TrainConfig(**{**CFG.__dict__, "seed": 1}),
        ClusterConfig(k_max=5),
        torch.device("cpu"),
    )
    assert not torch.equal(other.model.state_dict()["out.weight"], runs[0].model.state_dict()["out.weight"])


@pytest.mark.slow
def test_learns_the_toy_clusters():
    x, y = toy(480)
    cfg = TrainConfig(epochs=120, batch_size=32, beta=BetaConfig(warmup=30, interval=5))
    b = build(x, y, VAEConfig(n_in=40), cfg, ClusterConfig(k_max=6), torch.device("cpu"))
    assert b.manifest["metrics"]["train_labelled"]["ari"] > 0.9
    assert b.result.history[0].beta == 0 and b.result.history[-1].beta > 0
    assert 30 <= b.result.selected_epoch < 120


def test_nan_is_recovered_from_the_last_good_epoch():
    x, _ = toy()
    torch.manual_seed(0)
    model = VAE(VAEConfig(n_in=40))
    poisoned = []

    def poison(stats):
        if stats.epoch == 5 and not poisoned:
            poisoned.append(stats.epoch)
            with torch.no_grad():
                model.out.weight[0, 0] = float("nan")  # after the epoch's snapshot: the next epoch diverges

    r = fit(model, torch.from_numpy(x.reshape(len(x), -1)), TrainConfig(epochs=12, batch_size=64), on_epoch=poison)
    assert r.recoveries == 1 and r.history[5].recovered
    assert len(r.history) == 12
    assert all(bool(torch.isfinite(t).all()) for t in r.state_dict.values())


def test_semi_supervised_uses_labels_and_cycles_gamma():
    x, y = toy()
    for loss, low, high in (("prototype", 2.0, 2.0), ("ratio", 0.01, 0.2)):  # the default; the paper's cycle
        gamma = GammaConfig(start=10, period=10, low=low, high=high, loss=loss)
        cfg = TrainConfig(epochs=30, batch_size=64, semi_supervised=True, beta=BetaConfig(warmup=5), gamma=gamma)
        b = build(x, y, VAEConfig(n_in=40), cfg, ClusterConfig(k_max=5), torch.device("cpu"))
        g = b.manifest["history"]["gamma"]
        assert g[:10] == [0.0] * 10 and g[10:20] == [high] * 10 and g[20:] == [low] * 10
        assert all(c > 0 for c in b.manifest["history"]["cls"][10:])
        assert TrainConfig.from_dict(b.manifest["train"]) == cfg


def test_prototype_loss_separates_labelled_species_in_the_latent():
    # two species whose peaks lie 2 bins apart, each jittered: labels must pull them apart in the latent
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    bins = np.arange(40)
    x = np.exp(-0.5 * ((bins[None, :] - (20 + 2 * y[:, None] + rng.normal(0, 0.7, (300, 1)))) / 3.0) ** 2)
    x = (x + rng.normal(0, 0.05, x.shape)).clip(0, 1).astype(np.float32)[:, None, :]
    names = np.array(["a", "b"])[y]
    gamma = GammaConfig(start=10)
    margins = []
    for semi in (False, True):
        cfg = TrainConfig(
            epochs=150, batch_size=64, semi_supervised=semi, beta=BetaConfig(warmup=5), gamma=gamma, select="last"
        )
        b = build(x, names, VAEConfig(n_in=40), cfg, ClusterConfig(k_max=4), torch.device("cpu"))
        mu = b.model.encode(torch.from_numpy(x.reshape(300, -1)))[0].detach()
        margins.append(float(losses.prototype(mu, torch.from_numpy(y))))
    assert margins[1] < 0.5 * margins[0], margins  # a far smaller cross-entropy between the species with labels


def test_versions_without_a_label_loss_setting_read_back_with_the_papers():
    d = TrainConfig().to_dict()
    del d["gamma"]["loss"]
    assert TrainConfig.from_dict(d).gamma.loss == "ratio"
    with pytest.raises(ValueError, match="label loss"):
        GammaConfig(loss="triplet")
    assert GammaConfig.paper() == GammaConfig(low=0.01, high=0.2, loss="ratio")  # DESIGN §4


def test_bad_train_config_names_the_key():
    with pytest.raises(ValueError, match="select must be one of"):
        TrainConfig(select="first")


def test_scores_are_label_permutation_invariant():
    assert scores(np.array(["a", "a", "b"]), np.array([7, 7, 3])) == {"ari": 1.0, "ami": 1.0}


def test_small_sets_train_for_a_minimum_of_optimiser_steps():
    # 220 events: 22 held out, 198 trained in batches of 32 = 7 steps an epoch; 1000 steps need 143 epochs
    assert TrainConfig(epochs=10, batch_size=32, min_steps=1000).epochs_for(220) == 143
    # `wingbeat train`: 1000 epochs of 20 steps on the paper's 5,500 events, of 15 on 500 (batch 32), 2,143 of 7 on 220
    for n, epochs in ((5500, 1000), (500, 1000), (220, 2143)):
        assert TrainConfig(epochs=1000, batch_size=batch_size_for(n), min_steps=MIN_STEPS).epochs_for(n) == epochs
    assert TrainConfig(epochs=10, min_steps=0).epochs_for(220) == 10
    assert [batch_size_for(n) for n in (100, 220, 1000, 5500)] == [32, 32, 62, 256]
    x, _ = toy(n=120)
    cfg = TrainConfig(epochs=5, batch_size=32, min_steps=40, beta=BetaConfig(warmup=1))
    r = fit(VAE(VAEConfig(n_in=40)), torch.from_numpy(x.reshape(len(x), -1)), cfg)
    assert len(r.history) == 10  # 108 trained events = 4 steps an epoch


def test_too_few_held_out_events_keep_the_last_epoch():
    x, _ = toy(n=240)  # 24 held out
    xt = torch.from_numpy(x.reshape(len(x), -1))
    cfg = TrainConfig(epochs=40, batch_size=32, beta=BetaConfig(warmup=5))
    assert fit(VAE(VAEConfig(n_in=40)), xt, cfg).selected_epoch == 39
    trusted = fit(VAE(VAEConfig(n_in=40)), xt, TrainConfig(**{**cfg.__dict__, "select_min_held_out": 20}))
    assert trusted.selected_epoch == int(np.argmin([h.val_rec + h.val_kl for h in trusted.history[5:]])) + 5


def test_restarts_keep_the_training_whose_clusters_agree_best_with_the_others():
    x, _ = toy()
    unlabelled = np.full(len(x), "")
    cfg = TrainConfig(**{**CFG.__dict__, "seed": 4, "restarts": 3})
    b = build(x, unlabelled, VAEConfig(n_in=40), cfg, ClusterConfig(k_max=5), torch.device("cpu"))
    r = b.manifest["restarts"]
    assert r["seeds"] == cfg.restart_seeds() == [4, 100_007, 200_010]
    # each restart is the plain training of its seed; the agreement is the mean ARI against the other two
    singles = [
        build(
            x,
            unlabelled,
            VAEConfig(n_in=40),
            TrainConfig(**{**CFG.__dict__, "seed": s}),
            ClusterConfig(k_max=5),
            torch.device("cpu"),
        )
        for s in r["seeds"]
    ]
    parts = []
    for s in singles:
        mu, err = (t.double().numpy() for t in encode_mu(s.model, torch.from_numpy(x.reshape(len(x), -1))))
        parts.append(s.clusterer.assign(mu, err).cluster)
    ari = [[scores(p, q)["ari"] for q in parts] for p in parts]
    mean = [(sum(row) - row[i]) / 2 for i, row in enumerate(ari)]
    assert r["agreement"] == pytest.approx(mean, abs=1e-4) and r["kept"] == int(np.argmax(mean))
    assert len(set(np.round(mean, 4))) > 1  # the restarts differ, so the choice is a real one
    kept = singles[r["kept"]].model.state_dict()
    assert all(torch.equal(t, kept[k]) for k, t in b.model.state_dict().items())
    assert TrainConfig.from_dict(b.manifest["train"]) == cfg  # the manifest holds the restarts and first seed
    # a fine-tune continues its parent: one training whatever the setting
    tune = build(
        x,
        unlabelled,
        VAEConfig(n_in=40),
        TrainConfig(**{**cfg.__dict__, "epochs": 3}),
        ClusterConfig(k_max=5),
        torch.device("cpu"),
        init=kept,
        schedule=b.result.schedule,
    )
    assert tune.manifest["restarts"] == {"seeds": [4], "agreement": [1.0], "kept": 0}


def test_small_sets_get_three_restarts():
    assert [restarts_for(n) for n in (16, 220, 499, 500, 5500)] == [3, 3, 3, 1, 1]
    assert TrainConfig().restarts == 1 and TrainConfig(seed=2).restart_seeds() == [2]
    with pytest.raises(ValueError, match="restarts must be >= 1"):
        TrainConfig(restarts=0)


def test_one_flat_adam_steps_as_adam_per_parameter_and_fit_leaves_parameters_of_their_own():
    """fit (one process) steps Adam on one flat tensor whose views are the parameters: the same weights, bit for
    bit, as Adam over the parameters one by one; after fit each parameter is a tensor of its own again."""
    import safetensors.torch

    from model.train import _flatten

    x = torch.from_numpy(toy(64)[0].reshape(64, -1))
    torch.manual_seed(5)
    flat_model = VAE(VAEConfig(n_in=40))
    each_model = VAE(VAEConfig(n_in=40))
    each_model.load_state_dict(flat_model.state_dict())
    flat = _flatten(flat_model)
    params = list(flat_model.parameters())
    assert all(p.data.untyped_storage().data_ptr() == flat.data.untyped_storage().data_ptr() for p in params)
    flat_opt = torch.optim.Adam([flat], lr=1e-3, foreach=True)
    each_opt = torch.optim.Adam(each_model.parameters(), lr=1e-3, foreach=True)
    for step in range(5):
        for model, opt in ((flat_model, flat_opt), (each_model, each_opt)):
            torch.manual_seed(step)  # the same reparameterisation noise
            if model is flat_model:
                flat.grad.zero_()
            else:
                opt.zero_grad(set_to_none=True)
            recon, mu, logvar = model(x)
            (losses.reconstruction(recon, x) + losses.kl_standard_normal(mu, logvar)).backward()
            opt.step()
    assert float(flat.grad.abs().sum()) > 0  # backward accumulated into the flat gradient
    for (k, a), b in zip(flat_model.state_dict().items(), each_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not torch.equal(
        flat_model.state_dict()["encoder.0.weight"], VAE(VAEConfig(n_in=40)).state_dict()["encoder.0.weight"]
    )

    model = VAE(VAEConfig(n_in=40))
    result = fit(model, x, TrainConfig(epochs=3, batch_size=16))
    storages = {p.data.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters())) and all(p.grad is None for p in model.parameters())
    safetensors.torch.save(model.state_dict())  # refuses tensors that share memory
    safetensors.torch.save(result.state_dict)
