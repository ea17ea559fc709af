import numpy as np
import pytest
import scipy.signal

from model import blockdft, spectra
from model.spectra import FeatureConfig, featurise_events, featurise_spectra, log_minmax, scale_features, to_grid, welch

CFG = FeatureConfig()


def scipy_welch(x: np.ndarray, fs: float) -> np.ndarray:
    seg, hop, nfft = CFG.plan(fs, x.shape[-1])
    return scipy.signal.welch(
        x.astype(np.float64), fs, window="hann", nperseg=seg, noverlap=seg - hop, nfft=nfft, axis=-1
    )[1]


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64])
def test_welch_equals_scipy_for_mixed_batch(dtype):
    rng = np.random.default_rng(1)
    shapes = [(1, 5000), (2, 2080), (8, 1500), (3, 999), (2, 300), (1, 1000), (4, 10400)]  # incl. < one segment
    events = [(rng.normal(0, 3000, s)).astype(dtype) for s in shapes]
    fs = [20_800.0] * len(events)
    for (freqs, psd), x in zip(welch(events, fs, CFG), events, strict=True):
        ref = scipy_welch(x, 20_800.0)
        assert psd.shape == ref.shape
        np.testing.assert_allclose(psd, ref, rtol=2e-4, atol=1e-5 * ref.max())
        np.testing.assert_allclose(freqs[1], 10.4)  # nfft stays 2000, also for short events


def test_welch_equals_scipy_across_buffer_blocks_with_kept_bins():
    # ~2,000 segments: several passes through the FFT buffer, channels split across passes; bins cut at 2 kHz
    rng = np.random.default_rng(3)
    events = [rng.normal(0, 1000, (2, int(rng.uniform(0.1, 0.5) * 20_800))).astype(np.int16) for _ in range(40)]
    out = welch(events, [20_800.0] * len(events), CFG, f_keep=2000.0)
    for (freqs, psd), x in zip(out, events, strict=True):
        ref = scipy_welch(x, 20_800.0)[:, : len(freqs)]
        assert len(freqs) == 194 and freqs[-1] >= 2000.0
        np.testing.assert_allclose(psd, ref, rtol=2e-4, atol=1e-5 * ref.max())


def test_welch_removes_a_large_offset_per_segment_like_scipy():
    # ambient light: a DC level 30× the signal, drifting; segment means are removed exactly, not cancelled late
    rng = np.random.default_rng(4)
    t = np.arange(7000) / 20_800.0
    x = 20_000 + 3000 * t[None, :] + rng.normal(0, 600, (2, 7000)) + 500 * np.sin(2 * np.pi * 600 * t)
    events = [x.astype(np.int16), x[:, :2345].astype(np.float64)]
    for (freqs, psd), e in zip(welch(events, [20_800.0] * 2, CFG, f_keep=2000.0), events, strict=True):
        ref = scipy_welch(e, 20_800.0)[:, : len(freqs)]
        np.testing.assert_allclose(psd, ref, rtol=2e-4, atol=1e-5 * ref.max())
        np.testing.assert_allclose(psd[:, :3], ref[:, :3], rtol=2e-4)  # the lowest bins, where the offset was


def test_welch_other_sample_rate_matches_scipy():
    x = np.random.default_rng(2).normal(size=(2, 4000))
    ((freqs, psd),) = welch([x], [10_000.0], CFG)
    np.testing.assert_allclose(psd, scipy_welch(x, 10_000.0), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(freqs[1], 10_000.0 / 962)
    assert CFG.plan(10_000.0, 4000) == (481, 96, 962)


def test_grid_has_193_bins_at_10_4_hz():
    assert CFG.n_bins == 193
    np.testing.assert_allclose(CFG.grid[[0, 1, -1]], [0.0, 10.4, 1996.8])


def insect(fs: float, seconds: float = 0.3, seed: int = 0) -> np.ndarray:
    """The same insect seen by two instruments: 520 Hz wing beat with harmonics, equal noise density."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * seconds)) / fs
    env = np.exp(-0.5 * ((t - seconds / 2) / (seconds / 6)) ** 2)
    x = 1000 * env * (1 + 0.6 * np.sin(2 * np.pi * 520 * t) + 0.25 * np.sin(2 * np.pi * 1040 * t + 1))
    return (x + rng.normal(0, 0.5 * np.sqrt(fs / 2), len(t)))[None, :]


def test_feature_vectors_agree_across_sample_rates():
    batch = featurise_events([insect(10_000.0), insect(20_800.0)], [10_000.0, 20_800.0], CFG)
    assert batch.ok.all()
    a, b = batch.features[:, 0]
    assert np.corrcoef(a, b)[0, 1] > 0.98
    assert np.abs(a - b).mean() < 0.05
    assert a.argmax() == b.argmax() == round(520 / 10.4)
    other = featurise_events([insect(20_800.0, seed=5)], [20_800.0], CFG)
    assert other.ok.all()


def test_features_are_log_then_minmax_per_event():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 100, (2, 3000)).astype(np.int16)
    batch = featurise_events([x], [20_800.0], CFG)
    ((freqs, psd),) = welch([x], [20_800.0], CFG, f_keep=CFG.f_max)
    logp = np.log10(to_grid(freqs, psd, CFG.grid).astype(np.float64) + CFG.eps)
    expect = (logp - logp.min()) / (logp.max() - logp.min())  # min and max over both channels together
    np.testing.assert_allclose(batch.features[0], expect, atol=1e-6)
    assert batch.features.min() == 0 and batch.features.max() == 1


def test_bad_events_are_named_not_raised():
    rng = np.random.default_rng(4)
    good = rng.normal(size=(1, 3000))
    nan = good.copy()
    nan[0, 10] = np.nan
    batch = featurise_events(
        [good, np.zeros((1, 3000)), good[:, :10], nan, good], [20_800.0, 20_800.0, 20_800.0, 20_800.0, 3000.0], CFG, 100
    )
    assert batch.ok.tolist() == [True, False, False, False, False]
    assert {i: e.reason for i, e in batch.errors.items()} == {
        101: "constant",
        102: "too_short",
        103: "non_finite",
        104: "fs_too_low",
    }
    assert "event 101" in str(batch.errors[101])
    assert np.isnan(batch.features[1:]).all()


def test_spectra_and_feature_inputs():
    rng = np.random.default_rng(5)
    spectra = rng.uniform(0.1, 10, (3, 1, 193)).astype(np.float32)
    b = featurise_spectra(spectra, CFG.grid, CFG)
    logp = np.log10(spectra.astype(np.float64) + CFG.eps)
    lo, hi = logp.min(axis=(1, 2), keepdims=True), logp.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(b.features, (logp - lo) / (hi - lo), atol=1e-6)
    z = rng.normal(size=(2, 1, 256)).astype(np.float32)  # z-normalised rows: no log may be taken
    s = scale_features(z)
    np.testing.assert_allclose(
        s.features, (z - z.min(axis=(1, 2), keepdims=True)) / np.ptp(z, axis=(1, 2), keepdims=True), atol=1e-6
    )


def test_negative_power_and_off_grid_are_refused():
    batch = log_minmax(np.array([[[1.0, -2.0, 3.0]]]), eps=1e-10)
    assert not batch.ok[0] and batch.errors[0].reason == "negative_power"
    with pytest.raises(ValueError, match="outside"):
        to_grid(np.linspace(0, 1000, 50), np.ones((1, 50)), CFG.grid)


@pytest.mark.parametrize(
    "fs, n", [(20_800.0, 1000), (20_800.0, 1001), (20_800.0, 6241), (44_100.0, 9000), (20_904.0, 5000), (104.0, 300)]
)
def test_block_welch_equals_scipy_and_the_fft_per_segment(fs, n, monkeypatch):
    # the usual plan goes through shared blocks (matrix products); scipy and the FFT per segment agree with it
    seg, hop, nfft = CFG.plan(fs, n)
    assert blockdft.applies(seg, hop, nfft)  # blocks of 200, 200, 200, 424, 201 (odd: a centre sample) and 1 sample
    rng = np.random.default_rng(n)
    t = np.arange(n) / fs
    events = [
        (900 + 200 * np.sin(2 * np.pi * 480 * t) + rng.normal(0, 300, (2, n))).astype(np.int16),
        rng.normal(0, 1, (3, n + 137)),
    ]
    kept = min(200, nfft // 2 + 1)
    blocks = blockdft.welch_blocks(events, fs, seg, hop, nfft, kept)
    ref = np.concatenate([scipy_welch(e, fs)[:, :kept] for e in events])
    np.testing.assert_allclose(blocks, ref, rtol=2e-4, atol=1e-5 * ref.max())
    monkeypatch.setattr(blockdft, "applies", lambda *_: False)  # the FFT per segment, for the same events
    fft = spectra._welch_group(events, fs, seg, hop, nfft, kept)
    np.testing.assert_allclose(fft, blocks, rtol=2e-4, atol=1e-5 * ref.max())


def test_block_welch_is_only_for_plans_of_few_blocks():
    assert blockdft.applies(*CFG.plan(20_800.0, 5000))  # 1000-sample segments, hop 200: five blocks of 200
    assert not blockdft.applies(*CFG.plan(10_000.0, 4000))  # 481 and 96 share no factor: 481 blocks
    assert not blockdft.applies(*CFG.plan(20_800.0, 999))  # shorter than a segment: nfft is not twice the segment
