"""The β-VAE of Rydhmer & Selvan (2021): an MLP funnel to a small latent space and its mirror. No I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

ACTIVATIONS = ("leaky_relu", "relu")


@dataclass(frozen=True)
class VAEConfig:
    """Architecture. ``activation="relu"`` is the paper's; the default LeakyReLU keeps the 8 → 4 funnel alive."""

    n_in: int
    # 4, not the paper's 2: on the paper's data 2 dimensions lost species apart in one of three seeds (ARI 0.36;
    # 4 gave 0.46–0.47 in all three, docs/RESULTS.md). Plots show the latent on its two principal axes.
    latent_dim: int = 4
    hidden: tuple[int, ...] = (128, 128, 64, 32, 16, 8, 4)
    activation: str = "leaky_relu"
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        if self.n_in < 1 or self.latent_dim < 1 or any(h < 1 for h in self.hidden):
            raise ValueError(f"layer sizes must be positive, got n_in={self.n_in} hidden={self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        return cls(**{**d, "hidden": tuple(d["hidden"])})


def _mlp(sizes: list[int], cfg: VAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers.append(nn.Linear(a, b))
        layers.append(nn.LeakyReLU(cfg.negative_slope) if cfg.activation == "leaky_relu" else nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Encoder ``n_in → hidden… → (μ, log σ²)``; decoder ``latent → reversed(hidden)… → n_in`` with a sigmoid."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _mlp([cfg.n_in, *cfg.hidden], cfg)
        self.to_mu = nn.Linear(cfg.hidden[-1], cfg.latent_dim)
        self.to_logvar = nn.Linear(cfg.hidden[-1], cfg.latent_dim)
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden)], cfg)
        self.out = nn.Linear(cfg.hidden[0], cfg.n_in)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x.reshape(len(x), -1))  # (batch, hidden[-1])
        return self.to_mu(h), self.to_logvar(h)  # (batch, latent) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(self.decoder(z)))  # (batch, n_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        # Reparameterisation noise from torch's CPU generator on every device, moved to mu's: CUDA's generator
        # draws other numbers for the same seed, so a CUDA training would follow another path than the CPU one.
        # On the CPU this is the draw randn_like makes; the copy to a GPU is (batch, latent) floats per step.
        eps = torch.randn(mu.shape, dtype=mu.dtype).to(mu.device)  # (batch, latent)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar
