"""From features to a complete model version: fit the VAE, fit the latent clusters, record what happened.

Shared by ``wingbeat train`` and the background trainer. No I/O: arrays in, objects and a manifest out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from model.beta import BetaSchedule
from model.cards import cluster_cards
from model.cluster import ClusterConfig, LatentClusterer, fit_clusterer, most_agreeing
from model.evaluate import scores
from model.spectra import FeatureConfig
from model.train import EpochStats, Shard, TrainConfig, TrainResult, encode_mu, fit
from model.vae import VAE, VAEConfig


@dataclass
class Built:
    model: VAE
    clusterer: LatentClusterer
    result: TrainResult
    manifest: dict[str, Any]


def label_codes(labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Species names → integer codes (−1 for ""), and the names in code order."""
    names = sorted({str(s) for s in labels if s != ""})
    index = {s: i for i, s in enumerate(names)}
    return np.array([index.get(str(s), -1) for s in labels], dtype=np.int64), names


def _seeded_model(vae_cfg: VAEConfig, seed: int, init: dict[str, torch.Tensor] | None, device: torch.device) -> VAE:
    torch.manual_seed(seed)  # initial weights depend on the seed alone
    model = VAE(vae_cfg)
    if init is not None:
        model.load_state_dict(init)
    return model.to(device)


def build(
    features: np.ndarray,
    labels: np.ndarray,
    vae_cfg: VAEConfig,
    train_cfg: TrainConfig,
    cluster_cfg: ClusterConfig,
    device: torch.device,
    on_epoch: Callable[[EpochStats], None] | None = None,
    init: dict[str, torch.Tensor] | None = None,
    schedule: BetaSchedule | None = None,
    freqs: np.ndarray | None = None,
    shard: Shard | None = None,
) -> Built:
    """Train on ``features`` (events, channels, bins) with species ``labels`` (events,) str, "" = unlabelled.

    ``init`` (weights) and ``schedule`` (its β state) continue a model: a fine-tune. Otherwise training starts
    from seeded random weights and the whole β schedule. ``freqs`` (bins,) Hz is the features' frequency grid,
    for the cluster cards (``model.cards``); ``shard``: this process's part of a data-parallel training
    (``model.train.fit``). ``train_cfg.restarts`` > 1 trains a new model once per seed of
    ``train_cfg.restart_seeds()`` and keeps the one whose clusters of the training events agree best with the
    others' (``model.cluster.most_agreeing``); its seed is in the manifest. ``freqs`` defaults to the standard
    grid (``FeatureConfig().grid``) when the features' size fits it; otherwise (features from elsewhere, e.g. the
    UCR archive's) there are no cards.
    """
    flat = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)  # (events, inputs)
    x = torch.from_numpy(flat).to(device)
    codes, names = label_codes(labels)
    # a fine-tune continues one model; a new one is trained once per restart seed, the most agreeing kept
    seeds = train_cfg.restart_seeds() if init is None and schedule is None else [train_cfg.seed]
    runs = []
    for seed in seeds:
        model = _seeded_model(vae_cfg, seed, init, device)
        cfg = replace(train_cfg, seed=seed)
        result = fit(model, x, cfg, torch.from_numpy(codes), schedule=schedule, on_epoch=on_epoch, shard=shard)
        mu, err = (t.double().cpu().numpy() for t in encode_mu(model, x))
        semi = labels if train_cfg.semi_supervised else None
        clusterer = fit_clusterer(mu, err, cluster_cfg, semi, flat if cluster_cfg.method == "density" else None)
        runs.append((model, result, mu, err, clusterer, clusterer.assign(mu, err)))
    kept, agreement = most_agreeing([assigned.cluster for *_, assigned in runs])
    model, result, mu, err, clusterer, assigned = runs[kept]
    metrics: dict[str, Any] = {
        "n_clusters": clusterer.k,
        "novel_fraction": float(np.mean(assigned.cluster < 0)),
        "latent_std": mu.std(axis=0).tolist(),
    }
    grid = FeatureConfig().grid if freqs is None else np.asarray(freqs, np.float64)
    cards = []
    if x.shape[1] % len(grid) == 0:
        # (events, channels, bins), cards over the training events: what each cluster was fitted to
        spectra = x.cpu().numpy().reshape(len(x), -1, len(grid))
        cards = cluster_cards(spectra, grid, assigned.cluster, labels if (codes >= 0).any() else None)
    val = result.val_index.numpy()
    if len(val):
        metrics["val_rec"] = float(err[val].mean())
    if (codes >= 0).sum() >= 2:
        metrics["train_labelled"] = scores(codes[codes >= 0], assigned.cluster[codes >= 0])
    hist = result.history
    manifest = {
        "train": train_cfg.to_dict(),
        "cluster": asdict(cluster_cfg),
        "epochs": len(hist),
        "selected_epoch": result.selected_epoch,
        "recoveries": result.recoveries,
        # each restart's seed and the mean ARI of its training events' clusters against the other restarts'
        "restarts": {"seeds": seeds, "agreement": agreement.round(4).tolist(), "kept": kept},
        "n_events": len(x),
        "labels": names,
        "n_labelled": int((codes >= 0).sum()),
        "history": {
            "beta": [h.beta for h in hist],
            "gamma": [h.gamma for h in hist],
            "rec": [h.rec for h in hist],
            "kl": [h.kl for h in hist],
            "cls": [h.cls for h in hist],
            "val_rec": [None if math.isnan(h.val_rec) else h.val_rec for h in hist],
            "val_kl": [None if math.isnan(h.val_kl) else h.val_kl for h in hist],
            "seconds": [h.seconds for h in hist],
        },
        "beta_schedule": result.schedule.to_dict(),
        "metrics": metrics,
        "cards": cards,
        "device": str(device),
    }
    model.cpu()
    return Built(model, clusterer, result, manifest)
