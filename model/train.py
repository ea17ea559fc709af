"""The fit loop: whole tensors on the device, no per-item Dataset; progress through a callback. No I/O."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from model import losses
from model.beta import BetaConfig, BetaSchedule, GammaConfig
from model.vae import VAE

SELECT = ("best", "last", "cluster")
MIN_STEPS = 15_000  # `wingbeat train`'s floor: 1000 epochs of ~15 steps, what the batch rule gives 500–4,000 events
SMALL_SET = 500  # `wingbeat train` trains sets smaller than this ``SMALL_RESTARTS`` times (``restarts_for``)
SMALL_RESTARTS = 3


class TrainingDiverged(RuntimeError):
    """Losses or weights kept turning non-finite after every recovery."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``select="best"`` keeps the epoch with the best held-out score (see ``selection_score``);
    ``"last"`` keeps the final epoch, as the paper's code does; ``"cluster"`` keeps the candidate epoch whose
    latent of the training events falls into groups best, without labels (``_cluster_score``)."""

    epochs: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    beta: BetaConfig = field(default_factory=BetaConfig)
    gamma: GammaConfig = field(default_factory=GammaConfig)
    semi_supervised: bool = False
    val_fraction: float = 0.1
    select: str = "best"
    max_recoveries: int = 20
    # nats per latent dimension below which KL is not penalised (0 = plain KL, the paper's loss). With plain KL the
    # 2-D latent keeps one used dimension (std ~0.002 vs ~1); the floor keeps both (docs/RESULTS.md).
    free_bits: float = 1.0
    # Small sets: at least this many optimiser steps (more epochs when an epoch has few steps). 0 = ``epochs`` as
    # given. ``wingbeat train`` uses ``MIN_STEPS``; the daemon's trainer keeps its configured epochs.
    min_steps: int = 0
    # Held-out events needed to trust ``select="best"``: with fewer the last epoch is kept. On the paper's data with
    # 22 held out the held-out ELBO picked epochs 26–313 of 1000 on four of five seeds (ARI 0.17 against 0.28 for
    # the last epoch); with 55 it picked 655–963 and did better than the last (0.377 against 0.364; docs/RESULTS.md).
    select_min_held_out: int = 50
    # ``select="cluster"``: epochs between the candidates (after warm-up, and the last epoch) whose latent of the
    # training events is scored by ``model.cluster.cluster_quality``
    select_every: int = 10
    # ``select="cluster"``: a seeded subsample of at most this many training events is scored (the same events at
    # every candidate). Ward and the silhouette grow with its square: 1.9 s a candidate at 4,000 events, 0.36 s at
    # 1,500 (2-core VM), and a 1000-epoch training has 100 candidates. The daemon's first models and full retrains
    # on simulated deployments (600-1,000 events) were measured whole (docs/RESULTS.md "Counting species").
    select_events: int = 1500
    # Trainings from as many seeds (``restart_seeds``); the one whose clusters agree best with the others' is kept
    # (``model.build``). 1 = one training, as the paper's code does.
    restarts: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        if self.min_steps < 0 or self.select_min_held_out < 0:
            raise ValueError(
                f"min_steps and select_min_held_out must be >= 0, got {self.min_steps}, {self.select_min_held_out}"
            )
        if not (0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if not (0 <= self.val_fraction < 0.5):
            raise ValueError(f"val_fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.select_every < 1 or self.select_events < 10:
            raise ValueError(
                f"need select_every >= 1 and select_events >= 10, got {self.select_every} and {self.select_events}"
            )
        if self.select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {self.select!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def held_out(self, n_events: int) -> int:
        """Events of ``n_events`` held out for selection (none when that would be fewer than 10)."""
        return int(n_events * self.val_fraction) if n_events * self.val_fraction >= 10 else 0

    def epochs_for(self, n_events: int) -> int:
        """Epochs a training on ``n_events`` runs: ``epochs``, or more where ``min_steps`` asks for them."""
        steps = math.ceil((n_events - self.held_out(n_events)) / self.batch_size)
        return max(self.epochs, math.ceil(self.min_steps / steps)) if steps else self.epochs

    def restart_seeds(self) -> list[int]:
        """The seed of each restart: ``seed`` first, so one restart is the plain training of ``seed``."""
        return [self.seed + 100_003 * r for r in range(self.restarts)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        # versions written before the label loss was a setting used the paper's ratio
        gamma = GammaConfig(**{"loss": "ratio", **d["gamma"]})
        return cls(**{**d, "beta": BetaConfig(**d["beta"]), "gamma": gamma})


@dataclass(frozen=True)
class Shard:
    """This process's part of a data-parallel training (``torchrun``): rank ``rank`` of ``world`` processes.

    The launcher (``daemon.train.ddp``) injects the collectives, so this module opens no socket: ``all_sum`` adds a
    tensor over all ranks in place (``torch.distributed.all_reduce``) and ``wrap`` makes the module whose
    backward averages gradients over the ranks (``DistributedDataParallel``).
    """

    rank: int
    world: int
    all_sum: Callable[[torch.Tensor], None]
    wrap: Callable[[torch.nn.Module], torch.nn.Module]


@dataclass
class EpochStats:
    epoch: int
    beta: float  # β used in this epoch
    gamma: float
    rec: float  # mean per-event training losses
    kl: float
    cls: float
    val_rec: float  # held-out, decoding μ (NaN without a held-out set)
    val_kl: float
    seconds: float
    recovered: bool = False


@dataclass
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    history: list[EpochStats]
    selected_epoch: int
    schedule: BetaSchedule
    recoveries: int
    val_index: torch.Tensor  # rows of x held out for selection (on CPU)


def batch_size_for(n_events: int) -> int:
    """The batch size for ``n_events``: 256, smaller for small sets so that an epoch has a few optimiser steps
    (256 over 300 events is 2 steps, and the warm-up would hardly train the auto-encoder), never below 32."""
    return min(256, max(32, n_events // 16))


def restarts_for(n_events: int) -> int:
    """Restarts ``wingbeat train`` gives a set of ``n_events``: ``SMALL_RESTARTS`` below ``SMALL_SET``, else 1.

    Small sets are cheap to train and their trainings vary most from seed to seed: on the paper's data cut to 220
    events, single trainings scored ARI 0.213–0.419 (15 seeds) and the most agreeing of each three 0.346–0.396
    (docs/RESULTS.md)."""
    return SMALL_RESTARTS if n_events < SMALL_SET else 1


def selection_score(val_rec: float, val_kl: float) -> float:
    """Held-out negative ELBO at β = 1 (lower is better): comparable across epochs whatever β was."""
    return val_rec + val_kl


def _cluster_score(model: VAE, xt: torch.Tensor, cfg: TrainConfig, epoch: int, epochs: int) -> float:
    """``select="cluster"``: minus the label-free clustering quality of the training events' latent
    (``model.cluster.cluster_quality``, lower is better) on every ``cfg.select_every``-th epoch and the last one;
    NaN (not a candidate) on the others, and where the latent has no active dimension yet (``cluster_quality``).

    The held-out ELBO measures how well the model reconstructs, not how well its latent separates groups: on
    simulated deployments it kept latents whose clusters agreed less with the species (docs/RESULTS.md)."""
    if (epoch + 1) % cfg.select_every and epoch + 1 != epochs:
        return math.nan
    from model.cluster import ClusterConfig, cluster_quality

    mu = encode_mu(model, xt)[0].double().cpu().numpy()
    return -cluster_quality(mu, ClusterConfig(seed=cfg.seed, ward_events=cfg.select_events))


def _split(n: int, n_val: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def fit(
    model: VAE,
    x: torch.Tensor,
    cfg: TrainConfig,
    labels: torch.Tensor | None = None,
    schedule: BetaSchedule | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    shard: Shard | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``x`` (events, n_in), on x's device.

    ``shard``: data-parallel training. Every rank holds all of ``x`` and draws the same permutation each epoch;
    rank r trains on every ``world``-th event of it, with ``batch_size / world`` per step (the same global batch),
    gradients averaged over the ranks. The epoch's losses are summed over the ranks before β is decided, so
    every rank takes the same β; held-out scores use the same (synchronised) weights on every rank.

    ``labels`` (events,) int64 with −1 for unlabelled rows drives the clustering loss when
    ``cfg.semi_supervised``. ``schedule`` continues a β schedule (fine-tuning); a new one starts otherwise.
    Seeds torch's global generator with ``cfg.seed``: same seed, data and device → same weights.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = x.device
    x = x.reshape(len(x), -1)
    if labels is None or not cfg.semi_supervised:
        labels = torch.full((len(x),), -1, dtype=torch.long)
    labels = labels.to(device)
    train_idx, val_idx = _split(len(x), cfg.held_out(len(x)), gen)
    epochs = cfg.epochs_for(len(x))
    select = "last" if cfg.select == "best" and len(val_idx) < max(1, cfg.select_min_held_out) else cfg.select
    xt, yt = x[train_idx.to(device)], labels[train_idx.to(device)]
    xv = x[val_idx.to(device)]
    schedule = schedule or BetaSchedule(cfg.beta)
    forward = shard.wrap(model) if shard is not None else model  # DDP: broadcasts rank 0's weights
    rank, world = (shard.rank, shard.world) if shard is not None else (0, 1)
    step = max(1, cfg.batch_size // world)
    # One process: the parameters become views of one flat tensor, their gradients views of another, and Adam steps
    # that one tensor (one kernel per op, not one per parameter, and no per-parameter bookkeeping); the same
    # arithmetic element by element, so the same weights. DDP keeps its own gradient buckets: per-parameter Adam.
    # One tensor takes Adam's single-tensor path: the same ops without the lists of the foreach path (0.16 against
    # 0.21 ms a step over 105,009 values, the same values bit for bit).
    flat = _flatten(model) if shard is None else None
    params = [flat] if flat is not None else list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, foreach=flat is None)
    label_loss = losses.prototype if cfg.gamma.loss == "prototype" else losses.cluster_ratio
    history: list[EpochStats] = []
    good = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, -1, good[0])
    recoveries = 0
    gamma = 0.0
    epoch = 0
    while epoch < epochs:
        t0 = time.perf_counter()
        beta = schedule.beta
        if cfg.semi_supervised and not (cfg.beta.reference and schedule.frozen):
            gamma = cfg.gamma.at(schedule.epoch)  # schedule.epoch: a fine-tune continues the cycle (the
            # published code stopped cycling γ once β froze)
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(device)
        n_used = len(perm) // world * world  # every rank takes as many steps (DDP's all-reduce needs them all)
        perm = perm[rank:n_used:world]
        parts: list[torch.Tensor] = []  # per step: (rec, kl, cls), weighted by batch size and summed once an epoch
        sizes: list[int] = []
        for start in range(0, len(perm), step):
            idx = perm[start : start + step]
            xb = xt.index_select(0, idx)  # (batch, n_in); the same rows as xt[idx], in a fifth of the time
            recon, mu, logvar = forward(xb)
            rec = losses.reconstruction(recon, xb)
            kl = losses.kl_standard_normal(mu, logvar)
            kl_loss = losses.kl_free_bits(mu, logvar, cfg.free_bits) if cfg.free_bits > 0 else kl
            loss = rec + beta * kl_loss
            cls = label_loss(mu, yt.index_select(0, idx)) if gamma > 0 else rec.new_zeros(())
            loss = loss + gamma * cls
            if flat is not None:
                flat.grad.zero_()  # type: ignore[union-attr]  # the parameters' gradients are views of it
            else:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts.append(torch.stack([rec.detach(), kl.detach(), cls.detach()]))
            sizes.append(len(idx))
        sums = (torch.stack(parts).double() * torch.tensor(sizes, dtype=torch.float64, device=device)[:, None]).sum(0)
        if shard is not None:
            shard.all_sum(sums)  # the epoch's losses over every rank: each takes the same β from them
        rec_m, kl_m, cls_m = (sums / n_used).tolist()
        finite = all(math.isfinite(v) for v in (rec_m, kl_m, cls_m)) and all(
            bool(torch.isfinite(p).all()) for p in params
        )
        if not finite:  # roll back to the last good epoch and train it again with fresh noise and order
            recoveries += 1
            if recoveries > cfg.max_recoveries:
                if flat is not None:
                    _own_storage(model)
                raise TrainingDiverged(f"non-finite loss or weights {recoveries} times (last at epoch {epoch})")
            model.load_state_dict(good[0])
            opt.load_state_dict(good[1])
            if history:
                history[-1].recovered = True
            continue
        val_rec = val_kl = math.nan
        if len(xv):
            model.eval()
            with torch.no_grad():
                mu_v, logvar_v = model.encode(xv)
                val_rec = float(losses.reconstruction(model.decode(mu_v), xv))
                val_kl = float(losses.kl_standard_normal(mu_v, logvar_v))
        schedule.observe(rec_m, kl_m)
        stats = EpochStats(epoch, beta, gamma, rec_m, kl_m, cls_m, val_rec, val_kl, time.perf_counter() - t0)
        history.append(stats)
        good = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        if select != "last" and epoch >= cfg.beta.warmup:
            best_elbo = select == "best"
            score = selection_score(val_rec, val_kl) if best_elbo else _cluster_score(model, xt, cfg, epoch, epochs)
            if math.isfinite(score) and score < best[0]:
                best = (score, epoch, good[0])
        if on_epoch is not None:
            on_epoch(stats)
        epoch += 1
    if select == "last" or best[1] < 0:
        best = (math.nan, epochs - 1, good[0])
    if flat is not None:
        _own_storage(model)
    state = {k: v.clone() for k, v in best[2].items()}  # copies of views of the flat tensor: a tensor each
    model.load_state_dict(state)
    return TrainResult(state, history, best[1], schedule, recoveries, val_idx)


def _flatten(model: torch.nn.Module) -> torch.nn.Parameter:
    """Make ``model``'s parameters views of one flat parameter, and their gradients views of its gradient (zeros):
    backward then accumulates into the flat gradient in place. Returns the flat parameter."""
    params = list(model.parameters())
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    at = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[at : at + n].view_as(p)
        p.grad = flat.grad[at : at + n].view_as(p)
        at += n
    return flat


def _own_storage(model: torch.nn.Module) -> None:
    """Undo ``_flatten``: each parameter in a tensor of its own again, without a gradient, as a module's parameters
    usually are (safetensors, for one, refuses tensors that share memory)."""
    for p in model.parameters():
        p.data = p.data.clone()
        p.grad = None


@torch.no_grad()
def encode_mu(model: VAE, x: torch.Tensor, batch: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent means and per-event reconstruction error (decoding μ) for x (events, n_in)."""
    if model.training:  # eval() walks every module: skip it on the serving loop's small batches
        model.eval()
    mus, errs = [], []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch].reshape(-1, model.cfg.n_in)
        mu, _ = model.encode(xb)
        mus.append(mu)
        errs.append(((model.decode(mu) - xb) ** 2).sum(dim=1))
    return torch.cat(mus), torch.cat(errs)
