"""A simulated optical insect sensor (near-infrared wing-beat recorder). Pure: arrays in memory, seeded.

Each insect crosses the beam: a transit envelope multiplies a body term (slow, its shadow) and a wing term
(the wing-beat fundamental and its harmonics). Two wavelengths see different wing/body ratios (melanin
absorbs more at the shorter one); both carry ambient light with mains flicker, sensor noise, and int16
quantisation. Each species has its own wing-beat frequency, harmonic roll-off and colour; each event draws
its own frequency jitter, size, transit time and phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# (name, wing-beat fundamental in Hz): magnitudes as measured for these insects in flight
SPECIES = (
    ("Aedes aegypti F", 480.0),
    ("Aedes aegypti M", 690.0),
    ("Culex tarsalis F", 380.0),
    ("Culex tarsalis M", 560.0),
    ("Culex quinquefasciatus F", 420.0),
    ("Musca domestica", 190.0),
    ("Drosophila simulans", 230.0),
    ("Apis mellifera", 235.0),
    ("Bombus terrestris", 150.0),
    ("Chrysoperla carnea", 65.0),
    ("Pieris rapae", 12.0),
    ("Chironomus riparius", 320.0),
)


@dataclass(frozen=True)
class SimConfig:
    events: int = 2000
    species: int = 6
    seed: int = 0
    labelled_fraction: float = 1.0
    fs: float = 20_800.0  # Hz
    channels: int = 2
    min_duration: float = 0.1  # s
    max_duration: float = 0.5  # s
    rate: float = 20.0  # mean events per second, for t0_ns
    sensor: str = "sim-0"
    t0_ns: int = 1_790_000_000_000_000_000

    def __post_init__(self) -> None:
        if self.events < 1 or self.species < 1 or self.channels < 1:
            raise ValueError(
                f"events, species and channels must be >= 1, got {self.events}, {self.species}, {self.channels}"
            )
        if not 0 <= self.labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in [0, 1], got {self.labelled_fraction}")
        if not self.fs >= 4000:
            raise ValueError(f"fs must be >= 4000 Hz to cover the 2 kHz grid, got {self.fs}")
        if not 0 < self.min_duration <= self.max_duration:
            raise ValueError(f"need 0 < min_duration <= max_duration, got {self.min_duration}, {self.max_duration}")


def species_table(k: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per-species parameters; names beyond the known list are numbered."""
    out = []
    for j in range(k):
        name, f0 = SPECIES[j] if j < len(SPECIES) else (f"species-{j + 1:02d}", float(rng.uniform(40, 900)))
        out.append(
            {
                "name": name,
                "f_wing": f0,
                "rolloff": float(rng.uniform(0.35, 0.8)),  # amplitude ratio between successive harmonics
                "wing_body": float(rng.uniform(0.3, 1.5)),  # wing/body ratio at the first wavelength
                "melanin": float(rng.uniform(0.4, 1.0)),  # the second wavelength's wing/body ratio, relative
                "size": float(rng.uniform(0.4, 1.0)),
                "even": float(rng.uniform(0.3, 1.2)),  # weight of even harmonics (wing-shape asymmetry)
            }
        )
    return out


def simulate(cfg: SimConfig) -> dict[str, np.ndarray]:
    """A recordings data set (DESIGN §8) as a dict of arrays."""
    rng = np.random.default_rng(cfg.seed)
    table = species_table(cfg.species, rng)
    species = rng.integers(0, cfg.species, cfg.events)
    pieces, offsets, labels = [], [0], []
    ambient = rng.uniform(2000, 6000, cfg.channels)
    for i in range(cfg.events):
        sp = table[species[i]]
        n = int(rng.uniform(cfg.min_duration, cfg.max_duration) * cfg.fs)
        t = np.arange(n) / cfg.fs
        f = float(sp["f_wing"]) * rng.normal(1.0, 0.04)
        centre, width = t[-1] / 2, t[-1] / rng.uniform(4, 7)
        envelope = np.exp(-0.5 * ((t - centre) / width) ** 2)
        wing = np.zeros(n)
        for h in range(1, 8):
            amp = float(sp["rolloff"]) ** (h - 1) * (float(sp["even"]) if h % 2 == 0 else 1.0)
            wing += amp * np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi))
        size = float(sp["size"]) * rng.lognormal(0, 0.2) * 8000
        flicker = np.sin(2 * np.pi * 100.0 * t + rng.uniform(0, 2 * np.pi))
        chans = []
        for c in range(cfg.channels):
            ratio = float(sp["wing_body"]) * float(sp["melanin"]) ** (c / max(1, cfg.channels - 1))
            signal = size * envelope * (1.0 + ratio * 0.5 * wing)
            light = ambient[c] * (1 + 0.01 * flicker)
            chans.append(light + signal + rng.normal(0, 30.0, n))
        x = np.clip(np.rint(np.stack(chans)), -32768, 32767).astype(np.int16)  # (channels, samples)
        pieces.append(x.reshape(-1))
        offsets.append(offsets[-1] + x.size)
        labels.append(str(sp["name"]) if rng.random() < cfg.labelled_fraction else "")
    gaps = rng.exponential(1e9 / cfg.rate, cfg.events).astype(np.int64)
    return {
        "samples": np.concatenate(pieces),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "channels": np.full(cfg.events, cfg.channels, dtype=np.int64),
        "fs": np.full(cfg.events, cfg.fs, dtype=np.float64),
        "label": np.asarray(labels, dtype=str),
        "sensor": np.full(cfg.events, cfg.sensor),
        "t0_ns": cfg.t0_ns + np.cumsum(gaps),
    }
