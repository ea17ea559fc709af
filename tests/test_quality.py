"""Cluster quality cannot fall silently: a small, fixed training on the paper's data against a floor.

The floor was measured on this code (torch 2.13, one thread) and set a little below, so that a torch release that
changes the last digits passes and a real regression (a broken β rule, loss, clusterer or feature step) does not.
The full protocol with its seeds and baselines is ``make headtohead`` (docs/RESULTS.md).
"""

import numpy as np
import pytest
import torch

from model.build import build
from model.cluster import ClusterConfig
from model.evaluate import scores
from model.spectra import FeatureConfig, featurise_spectra
from model.train import TrainConfig, encode_mu
from model.vae import VAEConfig

TRAIN_PER_LABEL = 250  # events 0–249 of each label
EPOCHS = 600
MEASURED = {
    "ari": 0.378,
    "ami": 0.614,
}  # seed 0, events 500–749 of each label (the protocol's choose split), Ward clusters (the DP consensus measured
# 0.381 / 0.607 on the same latent); 35–115 s on a loaded 2-core machine
MARGIN = 0.04
HELD_OUT = ("25Hz", "90Hz", "130Hz", "180Hz")  # never labelled in the semi-supervised floor (as in make headtohead)
# the same training and events with the other 7 species labelled (prototype loss; the paper's spread ratio and
# γ cycle measured 0.401 / 0.633 here)
MEASURED_SEMI = {"ari": 0.466, "ami": 0.645}


def paper_split(data_dir):
    """Features, labels, and the training and scored events of the floor."""
    with np.load(data_dir / "dynamicbeta_synthetic_spectra.npz", allow_pickle=False) as d:
        x = featurise_spectra(d["spectra"], d["freqs"], FeatureConfig()).features
        y = d["label"]
    names = np.unique(y)
    train = np.concatenate([np.flatnonzero(y == s)[:TRAIN_PER_LABEL] for s in names])
    score = np.concatenate([np.flatnonzero(y == s)[500:750] for s in names])
    return x, y, train, score


@pytest.mark.slow
def test_semi_supervised_quality_floor(data_dir):
    x, y, train, score = paper_split(data_dir)
    labels = np.where(np.isin(y[train], HELD_OUT), "", y[train])
    b = build(
        x[train],
        labels,
        VAEConfig(n_in=x.shape[2]),
        TrainConfig(epochs=EPOCHS, seed=0, semi_supervised=True),
        ClusterConfig(seed=0),
        torch.device("cpu"),
    )
    mu, err = (t.double().numpy() for t in encode_mu(b.model, torch.from_numpy(x[score].reshape(len(score), -1))))
    got = scores(y[score], b.clusterer.assign(mu, err).cluster)
    assert got["ari"] >= MEASURED_SEMI["ari"] - MARGIN and got["ami"] >= MEASURED_SEMI["ami"] - MARGIN, got


@pytest.mark.slow
def test_paper_data_quality_floor(data_dir):
    x, y, train, score = paper_split(data_dir)
    b = build(
        x[train],
        np.full(len(train), ""),
        VAEConfig(n_in=x.shape[2]),
        TrainConfig(epochs=EPOCHS, seed=0),
        ClusterConfig(seed=0),
        torch.device("cpu"),
    )
    mu, err = (t.double().numpy() for t in encode_mu(b.model, torch.from_numpy(x[score].reshape(len(score), -1))))
    got = scores(y[score], b.clusterer.assign(mu, err).cluster)
    assert got["ari"] >= MEASURED["ari"] - MARGIN and got["ami"] >= MEASURED["ami"] - MARGIN, got
    # The cards name clusters by their wing-beat. The 500 Hz species is split over clusters (by its frequency
    # jitter among other things), so one part's median f0 can sit well off 500 Hz; over the clusters made mostly
    # of it, weighted by its events, the cards' f0 is within 10 % of it. (tests/test_cards.py checks the estimator
    # against every species name.)
    mu_t, err_t = (t.double().numpy() for t in encode_mu(b.model, torch.from_numpy(x[train].reshape(len(train), -1))))
    assigned = b.clusterer.assign(mu_t, err_t).cluster
    cards = {c["cluster"]: c for c in b.manifest["cards"]}
    assert sum(c["size"] for c in cards.values()) == (assigned >= 0).sum()
    f0s, counts = [], []
    for ident, card in cards.items():
        inside = y[train][assigned == ident]
        n500 = int((inside == "500Hz").sum())
        if n500 > 0.8 * len(inside) and card["f0_hz"] is not None:
            f0s.append(card["f0_hz"])
            counts.append(n500)
    assert f0s and np.average(f0s, weights=counts) == pytest.approx(500.0, rel=0.1), (f0s, counts)
