"""β and γ schedules (DESIGN §4). Pure: explicit state, advanced only by ``observe`` once per training epoch.

Validation never touches these objects. The dynamic rule, with ψ = sign, t the epoch just finished and t′ the
epoch β last changed::

    Δrec  = L_rec(t) − w1 · min L_rec(: t−1)
    Δreg  = L_KL(t)  − w2 · min L_KL(: t−1)
    ΔLrec = ψ[L_rec(t) − w3 · L_rec(t′)] + ψ[L_rec(t) − w4 · L_rec(t′)]
    β ← β − (b/4)(1 − ψ[Δreg])(1 + ψ[Δrec] + ΔLrec) + (a/4)(1 − ψ[Δrec])(1 − ψ[Δreg] − ΔLrec)

The minima are the rule's memory of earlier optima. By default (``memory="since_change"``) they cover only the
epochs trained with the current β: L_rec and L_KL depend on β, so an optimum reached under another β says little
about this one. With the whole history (``memory="all"``, the paper) a larger β is always judged against the
L_rec of small-β epochs, and looks like "reconstruction got worse" (β ↓), while a small β then reconstructs
better than at t′ (β ↑): β swings between two values for the rest of training (measured on the paper's data,
seed 1: 0.001 ↔ 0.201 from epoch 30 to 1000; docs/RESULTS.md).

``reference=True`` reproduces the published code's quirks: the histories' minimum includes epoch t, t′ starts
at the first warm-up epoch (β = 0, so the first decision always sees "reconstruction far better than at t′"
and β jumps), and the rule stops for good once β reaches the cap. The default starts the histories and t′ at
the first epoch trained with β > 0 and keeps deciding at the cap (β is clipped, and can come down again).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MODES = ("dynamic", "vanilla", "fixed")


@dataclass(frozen=True)
class BetaConfig:
    mode: str = "dynamic"  # dynamic: the rule; vanilla: β = 1; fixed: β = ``fixed``
    warmup: int = 25  # epochs trained with β = 0 (a plain auto-encoder)
    start: float = 1e-3  # β right after warm-up (dynamic)
    fixed: float = 1.0  # β after warm-up in "fixed" mode
    interval: int = 5  # epochs between decisions
    a: float = 0.2
    b: float = 0.05
    w1: float = 1.2
    w2: float = 1.2
    w3: float = 0.9
    w4: float = 1.1
    cap: float = 2.0
    reset: float = 0.05  # β when the rule would take it to ≤ 0
    memory: str = "since_change"  # since_change | all: which past epochs the minima cover (all with reference)
    reference: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.memory not in ("since_change", "all"):
            raise ValueError(f"memory must be since_change or all, got {self.memory!r}")
        if self.warmup < 0 or self.interval < 1:
            raise ValueError(f"warmup must be >= 0 and interval >= 1, got {self.warmup} and {self.interval}")
        if not (0 < self.reset <= self.cap and self.start > 0 and self.fixed >= 0):
            raise ValueError(f"need 0 < reset <= cap and start > 0, got reset={self.reset} cap={self.cap}")


@dataclass
class BetaSchedule:
    """The β schedule and its whole state. ``beta`` is the value for the next epoch."""

    cfg: BetaConfig = field(default_factory=BetaConfig)
    epoch: int = 0  # epochs observed
    beta: float = 0.0
    rec: list[float] = field(default_factory=list)  # L_rec of epochs in the rule's history
    kl: list[float] = field(default_factory=list)
    t_prime: int | None = None  # epoch β last changed (or the baseline epoch)
    t_prime_index: int = 0  # position in ``rec`` / ``kl`` of the first epoch trained with the current β
    rec_at_change: float | None = None  # L_rec(t′)
    last_decision: int = -1
    frozen: bool = False
    changes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.epoch == 0:
            self.beta = self._after_warmup() if self.cfg.warmup == 0 else 0.0

    def _after_warmup(self) -> float:
        return {"dynamic": self.cfg.start, "vanilla": 1.0, "fixed": self.cfg.fixed}[self.cfg.mode]

    def observe(self, rec: float, kl: float) -> float:
        """Record the epoch just trained (its mean L_rec and unweighted L_KL); return β for the next epoch."""
        cfg, t = self.cfg, self.epoch
        self.epoch += 1
        if cfg.reference and t == 0:
            self.t_prime, self.rec_at_change = 0, rec
        if t + 1 < cfg.warmup:
            return self.beta
        if t + 1 == cfg.warmup or cfg.mode != "dynamic":
            self.beta = self._after_warmup()
            return self.beta
        if self.frozen:
            return self.beta
        self.rec.append(float(rec))
        self.kl.append(float(kl))
        if self.rec_at_change is None:  # first epoch with β > 0: the baseline of the rule
            self.t_prime, self.rec_at_change, self.last_decision = t, float(rec), t
            self.t_prime_index = len(self.rec) - 1
            return self.beta
        if t - self.last_decision < cfg.interval:
            return self.beta
        since = 0 if (cfg.reference or cfg.memory == "all") else self.t_prime_index
        past = slice(since, None) if cfg.reference else slice(since, -1)
        if not self.rec[past]:  # no epoch with this β yet (interval 1, right after a change)
            return self.beta
        self.last_decision = t
        new = self.beta + beta_step(cfg, rec, kl, min(self.rec[past]), min(self.kl[past]), self.rec_at_change)
        if new <= 0:
            new = cfg.reset
        if new >= cfg.cap:
            new = cfg.cap
            self.frozen = cfg.reference
        if new != self.beta:
            self.t_prime, self.rec_at_change = t, float(rec)
            self.t_prime_index = len(self.rec)  # epoch t still ran with the old β
            self.changes.append(t)
        self.beta = float(new)
        return self.beta

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BetaSchedule:
        return cls(**{**d, "cfg": BetaConfig(**d["cfg"])})


def beta_step(cfg: BetaConfig, rec: float, kl: float, min_rec: float, min_kl: float, rec_at_change: float) -> float:
    """The change of β at one decision (the rule in the module docstring)."""
    d_rec = np.sign(rec - cfg.w1 * min_rec)
    d_reg = np.sign(kl - cfg.w2 * min_kl)
    d_lrec = np.sign(rec - cfg.w3 * rec_at_change) + np.sign(rec - cfg.w4 * rec_at_change)
    down = (cfg.b / 4) * (1 - d_reg) * (1 + d_rec + d_lrec)
    up = (cfg.a / 4) * (1 - d_rec) * (1 - d_reg - d_lrec)
    return float(up - down)


LABEL_LOSSES = ("prototype", "ratio")


@dataclass(frozen=True)
class GammaConfig:
    """The clustering loss on labelled events (``loss``, see ``model.losses``) and its weight: 0 until ``start``,
    then ``low`` and ``high`` alternating every ``period``.

    The default is the prototype cross-entropy at a steady weight of 2; ``paper()`` gives the paper's loss (within-
    over between-class spread) and its cycle (0.01 / 0.2). Chosen on the protocol's choose events (docs/RESULTS.md):
    with the paper's loss the labels hardly shaped the latent, and a steady weight beat a cycled one.
    """

    start: int = 50
    low: float = 2.0
    high: float = 2.0
    period: int = 100
    loss: str = "prototype"

    def __post_init__(self) -> None:
        if self.loss not in LABEL_LOSSES:
            raise ValueError(f"the label loss must be one of {LABEL_LOSSES}, got {self.loss!r}")
        if self.start < 0 or self.period < 1 or self.low < 0 or self.high < 0:
            raise ValueError(f"need start >= 0, period >= 1 and weights >= 0, got {self}")

    @classmethod
    def paper(cls) -> GammaConfig:
        return cls(low=0.01, high=0.2, loss="ratio")

    def at(self, epoch: int) -> float:
        if epoch < self.start:
            return 0.0
        return self.high if (epoch // self.period) % 2 == 1 else self.low
