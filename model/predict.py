"""Serving a model version: features → latent means → stable cluster IDs, probability, novelty. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import ModelVersion
from model.train import encode_mu


@dataclass
class Prediction:
    latent: np.ndarray  # (events, latent) μ
    rec_error: np.ndarray  # (events,) summed squared error of decoding μ
    cluster: np.ndarray  # (events,) stable IDs, −1 = novel
    probability: np.ndarray  # (events,)
    novelty: np.ndarray  # (events,)


def predict(version: ModelVersion, features: np.ndarray) -> Prediction:
    """Run ``features`` (events, channels, bins) through a model version; shapes must match its input."""
    n_in = version.model.cfg.n_in
    x = np.ascontiguousarray(features, dtype=np.float32).reshape(len(features), -1)
    if x.shape[1] != n_in:
        raise ValueError(
            f"the model expects {n_in} inputs per event, these features have {x.shape[1]} "
            f"(shape {tuple(features.shape[1:])})"
        )
    mu_t, err_t = encode_mu(version.model, torch.from_numpy(x))
    mu, err = mu_t.double().numpy(), err_t.double().numpy()
    a = version.clusterer.assign(mu, err)
    return Prediction(mu, err, a.cluster, a.probability, a.novelty)
