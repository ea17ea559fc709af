"""Model versions as bytes (DESIGN §6): safetensors weights and clusterer, a JSON manifest. Pure: no files.

``pack`` turns a trained model into ``{file name: bytes}``; ``unpack`` checks and rebuilds it. The manifest
records the SHA-256 of every other file, so a truncated or edited file is refused, and safetensors holds
only raw tensors, so loading never runs pickle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from model.cluster import LatentClusterer
from model.spectra import FeatureConfig
from model.vae import VAE, VAEConfig

FORMAT = 1
WEIGHTS = "weights.safetensors"
CLUSTERER = "clusterer.safetensors"
MANIFEST = "manifest.json"
FILES = (WEIGHTS, CLUSTERER, MANIFEST)


class CheckpointError(ValueError):
    """A model version that cannot be trusted or read; the message says which file and why."""


@dataclass
class ModelVersion:
    model: VAE
    clusterer: LatentClusterer
    features: FeatureConfig
    input_kind: str  # "recordings" | "spectra" | "features": how the training data became features
    manifest: dict[str, Any]


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def pack(
    model: VAE, clusterer: LatentClusterer, features: FeatureConfig, input_kind: str, manifest: dict[str, Any]
) -> dict[str, bytes]:
    """Serialise a model version. ``manifest`` holds the free-form record (config, history, metrics …)."""
    weights = safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    arrays = {k: np.ascontiguousarray(v) for k, v in clusterer.to_arrays().items()}
    clus = safetensors.numpy.save(arrays)
    doc = {
        **manifest,
        "format": FORMAT,
        "vae": model.cfg.to_dict(),
        "features": {**features.__dict__},
        "input_kind": input_kind,
        "n_clusters": clusterer.k,
        "files": {WEIGHTS: _sha256(weights), CLUSTERER: _sha256(clus)},
    }
    return {WEIGHTS: weights, CLUSTERER: clus, MANIFEST: json.dumps(doc, indent=1, allow_nan=False).encode()}


def unpack(files: dict[str, bytes]) -> ModelVersion:
    """Check and rebuild a model version from its files; raises CheckpointError naming the problem."""
    missing = [f for f in FILES if f not in files]
    if missing:
        raise CheckpointError(f"missing {', '.join(missing)}")
    try:
        doc = json.loads(files[MANIFEST])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{MANIFEST}: unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
    for name in (WEIGHTS, CLUSTERER):
        if doc.get("files", {}).get(name) != _sha256(files[name]):
            raise CheckpointError(f"{name} does not match the checksum in {MANIFEST} (truncated or modified)")
    try:
        vae_cfg = VAEConfig.from_dict(doc["vae"])
        feat_cfg = FeatureConfig(**doc["features"])
        input_kind = str(doc["input_kind"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{MANIFEST}: bad configuration ({e})") from None
    try:
        state = safetensors.torch.load(files[WEIGHTS])
        arrays = safetensors.numpy.load(files[CLUSTERER])
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"cannot parse a safetensors file ({e})") from None
    model = VAE(vae_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{WEIGHTS} does not fit the configured network: {str(e).splitlines()[0]}") from None
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise CheckpointError(f"{WEIGHTS} holds non-finite weights")
    try:
        clusterer = LatentClusterer.from_arrays(arrays)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{CLUSTERER}: {e}") from None
    model.eval()
    return ModelVersion(model, clusterer, feat_cfg, input_kind, doc)
