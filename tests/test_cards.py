import numpy as np
import pytest

from model.cards import cluster_cards, format_cards, fundamental, harmonic_strengths
from model.spectra import FeatureConfig, featurise_events, featurise_spectra

CFG = FeatureConfig()
FS = 20_800.0


def harmonic_event(f0: float, rolloff: float, rng: np.random.Generator, seconds: float = 0.3) -> np.ndarray:
    """(1, samples) a wing-beat: harmonics of ``f0`` Hz with amplitude ratio ``rolloff``, on a slow body term."""
    t = np.arange(int(seconds * FS)) / FS
    wing = sum(rolloff ** (h - 1) * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) for h in range(1, 7))
    body = np.exp(-0.5 * ((t - t[-1] / 2) / (t[-1] / 5)) ** 2)
    return (1000 * body * (1 + 0.5 * wing) + rng.normal(0, 20, len(t)))[None]


@pytest.mark.parametrize("f0", [62.0, 83.0, 137.0, 240.0, 411.0, 777.0])
def test_fundamental_of_synthetic_harmonic_signals(f0):
    # known answer: within half a bin of the 10.4 Hz grid, whatever the harmonics' roll-off
    rng = np.random.default_rng(int(f0))
    events = [harmonic_event(f0, r, rng) for r in (0.3, 0.6, 0.9)]
    x = featurise_events(events, [FS] * 3, CFG).features[:, 0]  # (events, bins)
    np.testing.assert_allclose(fundamental(x, CFG.grid), f0, atol=CFG.df / 2)


def test_fundamental_is_not_fooled_into_octaves():
    # a weak fundamental and strong even harmonics: the half (subharmonic) and double (octave) are both wrong
    grid = CFG.grid
    spec = np.zeros(len(grid))
    for h, a in ((1, 0.5), (2, 1.0), (3, 0.4), (4, 0.8)):
        spec[14 * h] = a  # f0 on bin 14: 145.6 Hz
    assert fundamental(spec, grid) == pytest.approx(145.6, abs=CFG.df / 2)
    assert harmonic_strengths(spec, grid, 145.6) == pytest.approx([1.0, 2.0, 0.8, 1.6])


def test_fundamental_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="bins"):
        fundamental(np.zeros((2, 10)), CFG.grid)


def test_cards_agree_with_paper_species_names(data_dir):
    # The paper's species are named after their wing-beat. At 10.4 Hz bins and with the body's power below 40 Hz,
    # "5Hz" and "25Hz" cannot be resolved (the cards say so: f0 None); every other species is within 6 % (or one
    # bin, where 6 % is less than a bin). The clusters are built here, not taken from the labels: each species
    # i (slowest first) is a cluster of arbitrary ID holding 200 - 3i of its events; 2i more go to the next
    # species' cluster and i are novel (-1), so every card must count two species and leave the novel ones out.
    with np.load(data_dir / "dynamicbeta_synthetic_spectra.npz", allow_pickle=False) as d:
        species = sorted(np.unique(d["label"]), key=lambda s: float(s.removesuffix("Hz")))
        rows = np.concatenate([np.flatnonzero(d["label"] == s)[:200] for s in species])
        x = featurise_spectra(d["spectra"][rows], d["freqs"], CFG).features
        y = d["label"][rows]
    assert len(species) == 11 and len(y) == 11 * 200
    ident = [int(i) for i in np.random.default_rng(7).permutation(11) * 3 + 5]
    clusters = np.empty(len(y), dtype=int)
    for i in range(11):
        part = np.full(200, ident[i])
        part[200 - 3 * i : 200 - i] = ident[i + 1] if i < 10 else -1
        part[200 - i :] = -1
        clusters[200 * i : 200 * (i + 1)] = part
    cards = cluster_cards(x, CFG.grid, clusters, y)
    # known answer: cluster i holds 200 - 3i of species i and 2(i - 1) of species i - 1; 198 - i events (200
    # for the first), so the cards come largest first in species order; 75 events are novel
    assert [c["cluster"] for c in cards] == ident
    assert [c["size"] for c in cards] == [200, *(198 - i for i in range(1, 11))]
    assert sum(c["size"] for c in cards) == len(y) - 75
    for i, card in enumerate(cards):
        expected = {species[i]: 200 - 3 * i, **({species[i - 1]: 2 * (i - 1)} if i > 1 else {})}
        assert card["species"] == expected and list(card["species"]) == list(expected)
        named = float(species[i].removesuffix("Hz"))
        if named < 40:
            assert card["f0_hz"] is None and card["harmonics"] is None
        else:
            assert card["f0_hz"] == pytest.approx(named, abs=max(0.06 * named, CFG.df)), species[i]
            assert card["f0_iqr_hz"][0] <= card["f0_hz"] <= card["f0_iqr_hz"][1]
            assert card["harmonics"][0] == 1.0
        assert np.shape(card["mean_spectrum"]) == (1, CFG.n_bins)
    np.testing.assert_allclose(cards[4]["mean_spectrum"], x[clusters == ident[4]].mean(axis=0), atol=1e-4)


def test_cards_per_cluster_counts_and_novel_events():
    rng = np.random.default_rng(0)
    events = [harmonic_event(f, 0.6, rng) for f in (120.0,) * 5 + (300.0,) * 3 + (200.0,)]
    x = featurise_events(events, [FS] * len(events), CFG).features
    clusters = np.array([4] * 5 + [7] * 3 + [-1])
    labels = np.array(["a", "a", "a", "", "b", "c", "c", "", ""])
    cards = cluster_cards(x, CFG.grid, clusters, labels)
    assert [c["cluster"] for c in cards] == [4, 7]  # largest first; novel events get no card
    assert [c["size"] for c in cards] == [5, 3]
    assert cards[0]["species"] == {"a": 3, "b": 1} and cards[1]["species"] == {"c": 2}
    assert cards[0]["f0_hz"] == pytest.approx(120.0, abs=CFG.df / 2)
    assert cards[1]["f0_hz"] == pytest.approx(300.0, abs=CFG.df / 2)
    np.testing.assert_allclose(cards[1]["mean_spectrum"], x[5:8].mean(axis=0), atol=1e-4)


def test_format_cards_table():
    cards = [
        {
            "cluster": 3,
            "size": 120,
            "f0_hz": 177.8,
            "f0_iqr_hz": [165.0, 190.8],
            "harmonics": [1.0, 0.5, 0.25, 0.0],
            "species": {"180Hz": 90, "160Hz": 5, "200Hz": 2, "5Hz": 1},
        },
        {"cluster": 0, "size": 7, "f0_hz": None, "f0_iqr_hz": None, "harmonics": None, "species": {}},
    ]
    header, first, second = format_cards(cards)
    assert header.split()[:3] == ["cluster", "size", "f0"]
    assert first.split() == [
        "3",
        "120",
        "177.8",
        "165-191",
        "1.00",
        "0.50",
        "0.25",
        "0.00",
        "180Hz",
        "90,",
        "160Hz",
        "5,",
        "200Hz",
        "2,",
        "+1",
        "more",
    ]
    assert second.split() == ["0", "7", "-", "below", "f0", "range", "-", "-"]
