"""Loss terms, each averaged over the events of a batch. Pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reconstruction(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Summed squared error per event, mean over events. recon, x: (batch, n_in)."""
    return ((recon - x.reshape(recon.shape)) ** 2).sum(dim=1).mean()


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per event, mean over events. mu, logvar: (batch, latent)."""
    return (-0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(dim=1)).mean()


def kl_free_bits(mu: torch.Tensor, logvar: torch.Tensor, floor: float) -> torch.Tensor:
    """KL for the loss with a floor of ``floor`` nats per latent dimension (batch mean): a dimension whose KL is
    already below the floor feels no pull towards the prior, so no dimension collapses onto it."""
    per_dim = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean(dim=0)  # (latent,)
    return torch.clamp(per_dim, min=floor).sum()


def _labelled_centres(mu: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The labelled rows (labels ≥ 0) of mu, each one's class index, and the class means (classes, latent)."""
    keep = labels >= 0
    mu, labels = mu[keep], labels[keep]
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    centres = torch.zeros(len(classes), mu.shape[1], dtype=mu.dtype, device=mu.device).index_add_(0, inverse, mu)
    return mu, inverse, centres / counts[:, None].to(mu.dtype)


def cluster_ratio(mu: torch.Tensor, labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Within-class spread over between-class spread of the latent means (smaller is better).

    within = Σ_k (n_k / n) · mean_{i∈k} ‖μ_i − c_k‖ ; between = mean_k ‖c_k − mean_j c_j‖, over labels ≥ 0.
    Returns 0 (with a graph) when fewer than two classes are present, so it can always be added to a loss.
    """
    mu, inverse, centres = _labelled_centres(mu, labels)
    if len(centres) < 2:
        return mu.sum() * 0.0
    dist = torch.linalg.vector_norm(mu - centres[inverse], dim=1)  # (labelled,)
    within = dist.sum() / len(mu)  # = Σ_k (n_k/n) · mean distance in class k
    between = torch.linalg.vector_norm(centres - centres.mean(dim=0), dim=1).mean()
    return (within + eps) / (between + eps)


def prototype(mu: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each labelled event's species under a softmax over −‖μ_i − c_k‖² / temperature, c_k the
    batch mean of species k (prototypical networks), mean over labels ≥ 0.

    Unlike ``cluster_ratio`` it is not scale-free: species must lie apart by a margin measured in the prior's
    units, which the KL term holds, so the latent cannot satisfy it by shrinking onto a line. Returns 0 (with a
    graph) when fewer than two classes are present.
    """
    mu, inverse, centres = _labelled_centres(mu, labels)
    if len(centres) < 2:
        return mu.sum() * 0.0
    d2 = ((mu[:, None, :] - centres[None]) ** 2).sum(dim=2)  # (labelled, classes)
    return F.cross_entropy(-d2 / temperature, inverse)
