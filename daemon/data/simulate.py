"""A simulated optical insect sensor (near-infrared wing-beat recorder). Pure: arrays in memory, seeded.

Each insect crosses the beam: a transit envelope multiplies a body term (slow, its shadow) and a wing term
(the wing-beat fundamental and its harmonics). Two wavelengths see different wing/body ratios (melanin
absorbs more at the shorter one); both carry ambient light with mains flicker, sensor noise, and int16
quantisation. Each species has its own wing-beat frequency, harmonic roll-off and colour; each event draws
its own frequency jitter, size, transit time and phase.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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
    noise: float = 30.0  # sensor noise, standard deviation in ADC counts
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
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
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


def _event(sp: dict[str, Any], cfg: SimConfig, ambient: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One crossing of the beam by an insect of species ``sp``: (channels, samples) int16."""
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
        chans.append(light + signal + rng.normal(0, cfg.noise, n))
    return np.clip(np.rint(np.stack(chans)), -32768, 32767).astype(np.int16)


def recordings(
    table: list[dict[str, Any]], species: np.ndarray, t0_ns: np.ndarray, cfg: SimConfig, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A recordings data set (DESIGN §8) of one event per entry of ``species`` (indices into ``table``) at
    ``t0_ns`` (events,) int64 ns."""
    pieces, offsets, labels = [], [0], []
    ambient = rng.uniform(2000, 6000, cfg.channels)
    for i in range(len(species)):
        sp = table[species[i]]
        x = _event(sp, cfg, ambient, rng)  # (channels, samples)
        pieces.append(x.reshape(-1))
        offsets.append(offsets[-1] + x.size)
        labels.append(str(sp["name"]) if rng.random() < cfg.labelled_fraction else "")
    n = len(species)
    return {
        "samples": np.concatenate(pieces) if pieces else np.empty(0, np.int16),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "channels": np.full(n, cfg.channels, dtype=np.int64),
        "fs": np.full(n, cfg.fs, dtype=np.float64),
        "label": np.asarray(labels, dtype=str),
        "sensor": np.full(n, cfg.sensor),
        "t0_ns": np.asarray(t0_ns, dtype=np.int64),
    }


def simulate(cfg: SimConfig) -> dict[str, np.ndarray]:
    """A recordings data set (DESIGN §8) as a dict of arrays: species drawn uniformly, events at a steady rate."""
    rng = np.random.default_rng(cfg.seed)
    table = species_table(cfg.species, rng)
    species = rng.integers(0, cfg.species, cfg.events)
    data = recordings(table, species, np.zeros(cfg.events, np.int64), cfg, rng)
    gaps = rng.exponential(1e9 / cfg.rate, cfg.events).astype(np.int64)
    data["t0_ns"] = cfg.t0_ns + np.cumsum(gaps)
    return data


# A deployment: several days of one station whose community changes. Each preset is a Community; a JSON file may
# override any of its fields (``community_from``).
@dataclass(frozen=True)
class Community:
    """How a simulated deployment's community is drawn (all per seed).

    Parameters
    ----------
    species_min, species_max : the number of species is drawn in this range (both included), unless ``species``.
    species : a fixed number of species (0 = drawn).
    f_min, f_max : wing-beat fundamentals are drawn log-uniformly in this range, Hz.
    min_spacing : smallest ratio between two species' fundamentals, as log(f2/f1) (0.1 ≈ 10 %).
    sigma_base : spread of the species' base abundances (log-normal σ).
    sigma_day : spread of each species' day-to-day abundance factor (log-normal σ).
    sigma_total : spread of each day's total activity (log-normal σ).
    turnover : share of species present only on a stretch of days (they appear and vanish); the others fly
        every day.
    width_min, width_max : diel activity width (standard deviation), hours; the peak hour is uniform.
    """

    species_min: int = 5
    species_max: int = 10
    species: int = 0
    f_min: float = 60.0
    f_max: float = 900.0
    min_spacing: float = 0.1
    sigma_base: float = 0.8
    sigma_day: float = 0.6
    sigma_total: float = 0.3
    turnover: float = 0.35
    width_min: float = 1.0
    width_max: float = 4.0

    def __post_init__(self) -> None:
        if not 1 <= self.species_min <= self.species_max or self.species < 0:
            raise ValueError(
                f"need 1 <= species_min <= species_max and species >= 0, got {self.species_min}, "
                f"{self.species_max}, {self.species}"
            )
        if not 0 < self.f_min < self.f_max or self.min_spacing < 0:
            raise ValueError(f"need 0 < f_min < f_max and min_spacing >= 0, got {self.f_min}, {self.f_max}")
        if min(self.sigma_base, self.sigma_day, self.sigma_total) < 0 or not 0 <= self.turnover <= 1:
            raise ValueError("sigmas must be >= 0 and turnover in [0, 1]")
        if not 0 < self.width_min <= self.width_max:
            raise ValueError(f"need 0 < width_min <= width_max, got {self.width_min}, {self.width_max}")


COMMUNITIES = {
    # every species every day, abundances drifting a little
    "stable": Community(sigma_day=0.25, sigma_total=0.15, turnover=0.0),
    # species appear and vanish, abundances change by day (the default)
    "changing": Community(),
    # strong day-to-day swings: a species may dominate one day and nearly vanish the next
    "volatile": Community(species_min=6, species_max=12, sigma_base=1.0, sigma_day=1.2, turnover=0.5),
}


def community_from(spec: str) -> Community:
    """A preset name (``COMMUNITIES``) or a JSON object of Community fields, optionally with "preset" as its base."""
    import json

    if spec in COMMUNITIES:
        return COMMUNITIES[spec]
    try:
        d = json.loads(spec)
    except json.JSONDecodeError:
        raise ValueError(f"community must be one of {', '.join(COMMUNITIES)} or a JSON object, got {spec!r}") from None
    if not isinstance(d, dict):
        raise ValueError(f"community JSON must be an object, got {spec!r}")
    base = COMMUNITIES.get(str(d.pop("preset", "changing")))
    if base is None:
        raise ValueError(f"community preset must be one of {', '.join(COMMUNITIES)}")
    unknown = set(d) - set(Community.__dataclass_fields__)
    if unknown:
        raise ValueError(f"community has unknown fields {sorted(unknown)}")
    try:
        return replace(base, **d)
    except TypeError as e:
        raise ValueError(f"community JSON has a value of the wrong type ({e})") from None


def hill(counts: np.ndarray) -> dict[str, float]:
    """Observed Hill numbers of abundances ``counts``: q0 richness, q1 exp(Shannon, nats), q2 inverse Simpson."""
    c = np.asarray(counts, np.float64)
    c = c[c > 0]
    if not len(c):
        return {"q0": 0.0, "q1": 0.0, "q2": 0.0}
    p = c / c.sum()
    return {"q0": float(len(c)), "q1": float(np.exp(-(p * np.log(p)).sum())), "q2": float(1 / (p**2).sum())}


def deployment_table(com: Community, rng: np.random.Generator) -> list[dict[str, Any]]:
    """A species table drawn afresh: how many species, their fundamentals (spaced by ``com.min_spacing``), harmonic
    structure, colour and diel activity. Nothing in it is fixed across seeds."""
    k = com.species or int(rng.integers(com.species_min, com.species_max + 1))
    lo, hi = np.log(com.f_min), np.log(com.f_max)
    logs: list[float] = []
    while len(logs) < k:  # rejection: a draw too close to one kept is redrawn; a few rounds if the range is tight
        for _ in range(2000):
            v = float(rng.uniform(lo, hi))
            if all(abs(v - u) >= com.min_spacing for u in logs):
                logs.append(v)
                break
        else:
            raise ValueError(f"{k} species do not fit between {com.f_min:g} and {com.f_max:g} Hz at that spacing")
    table = species_table(k, rng)
    for j, sp in enumerate(table):
        sp["name"] = f"sp{j + 1:02d}-{np.exp(logs[j]):.0f}Hz"
        sp["f_wing"] = float(np.exp(logs[j]))
        sp["peak_hour"] = float(rng.uniform(0, 24))
        sp["width_h"] = float(rng.uniform(com.width_min, com.width_max))
    return table


def simulate_deployment(
    cfg: SimConfig, days: int, com: Community, start_ns: int = 1_780_272_000_000_000_000
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A deployment of ``days`` UTC days from ``start_ns`` (a midnight; default 2026-06-01) with ``cfg.events``
    events expected in all: the recordings data set, in time order, and its truth.

    Each species has a log-normal base abundance; each day multiplies it by a log-normal factor and each day's
    total activity varies too; species of the turnover share fly only on a stretch of consecutive days (at least
    one species flies every day). A day's events are a multinomial draw of its share of ``cfg.events``, each at a
    time of day drawn from its species' diel activity (normal around the peak hour, wrapped to the day).

    Returns
    -------
    The data set (``recordings``) and the truth: the species table, and per day and overall the true abundances
    (events per species) and their Hill numbers.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    rng = np.random.default_rng(cfg.seed)
    table = deployment_table(com, rng)
    k = len(table)
    base = rng.lognormal(0, com.sigma_base, k)
    factor = rng.lognormal(0, com.sigma_day, (k, days))
    present = np.ones((k, days), bool)
    transient = rng.random(k) < com.turnover
    transient[np.argmax(base)] = False  # the most abundant species flies every day
    for j in np.flatnonzero(transient):
        if days > 1:
            span = int(rng.integers(1, days))  # 1 … days−1 days
            first = int(rng.integers(0, days - span + 1))
            present[j] = False
            present[j, first : first + span] = True
    weight = base[:, None] * factor * present  # (species, days)
    total = rng.lognormal(0, com.sigma_total, days)
    per_day = rng.multinomial(cfg.events, total / total.sum())
    day_ns = 86_400 * 10**9
    species, t0 = [], []
    counts = np.zeros((k, days), np.int64)
    for d in range(days):
        counts[:, d] = rng.multinomial(per_day[d], weight[:, d] / weight[:, d].sum())
        sp = np.repeat(np.arange(k), counts[:, d])
        peak = np.array([table[j]["peak_hour"] for j in sp])
        width = np.array([table[j]["width_h"] for j in sp])
        hour = np.mod(rng.normal(peak, width), 24.0)
        species.append(sp)
        t0.append(start_ns + d * day_ns + (hour * 3600e9).astype(np.int64))
    sp_all, t0_all = np.concatenate(species), np.concatenate(t0)
    order = np.argsort(t0_all, kind="stable")
    data = recordings(table, sp_all[order], t0_all[order], cfg, rng)
    names = [str(sp["name"]) for sp in table]

    def window(c: np.ndarray, start: int, end: int) -> dict[str, Any]:
        return {
            "start_ns": start,
            "end_ns": end,
            "events": int(c.sum()),
            "abundance": {names[j]: int(c[j]) for j in range(k) if c[j] > 0},
            "hill": hill(c),
        }

    truth = {
        "seed": cfg.seed,
        "days": days,
        "community": asdict(com),
        "instrument": {"fs": cfg.fs, "channels": cfg.channels, "noise": cfg.noise},
        "species": [{**sp, "present_days": np.flatnonzero(present[j]).tolist()} for j, sp in enumerate(table)],
        "daily": [window(counts[:, d], start_ns + d * day_ns, start_ns + (d + 1) * day_ns) for d in range(days)],
        "overall": window(counts.sum(axis=1), start_ns, start_ns + days * day_ns),
    }
    return data, truth
