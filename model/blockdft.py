"""Welch by shared blocks: the common plan's PSD from matrix products instead of one FFT per segment. Pure.

With the usual plan (a Hann segment of ``seg`` samples, zero-padded to ``nfft = 2·seg``, hop ``hop``), segments
overlap by 80 %: an FFT per segment transforms every sample five times and computes ~1,000 bins of which the grid
keeps ~200. Here every channel is cut once into blocks of ``g = gcd(seg, hop)`` samples, and the kept bins of
each block's DFT come from float32 matrix products (bins only up to ``f_max``). The products are halved by the
block's symmetry: about its centre ``c``, a real block's DFT is ``e^{-iθc}·(Σ s_m·cos θm − i·Σ d_m·sin θm)``
with ``s_m = x[c+m] + x[c−m]`` and ``d_m = x[c+m] − x[c−m]``, so two products of ``g/2`` rows (cos by the sums,
sin by the differences) replace one of ``g`` rows by cos and sin both. A segment's DFT is then the sum
of its ``seg / g`` blocks' DFTs, each turned by the phase of its offset; the Hann window is applied in the
frequency domain (``0.5·X[k] − 0.25·X[k−2] − 0.25·X[k+2]`` on the 2·seg grid), and the segment mean is removed as
``mean · W[k]``, ``W`` the window's DFT. Same result as ``scipy.signal.welch`` (float32 rounding); on one core
about 1.5 times as fast as the FFT per segment (``bench/throughput.py`` prints both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

MAX_BLOCKS = 10  # blocks per segment; beyond this (a gcd that is small) the FFT per segment is cheaper
SHIFT = 2  # the Hann window's cosine, in bins of the 2·seg grid
CHUNK_FLOATS = 3 << 15  # samples per matrix product (384 KB): blocks, bins and segments stay in a core's L2 cache


def applies(seg: int, hop: int, nfft: int) -> bool:
    """Whether the block path computes this plan (else the FFT per segment does)."""
    return nfft == 2 * seg and seg // math.gcd(seg, hop) <= MAX_BLOCKS


@lru_cache(maxsize=16)
def _tables(seg: int, hop: int, nfft: int, kept: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """For bins −2 … kept+1 of the 2·seg grid: the block's cosines (g − g//2, K) and sines (g//2, K) float32 at the
    offsets from its centre (the centre sample itself first among the cosines when g is odd); the blocks' phases
    (L, K) complex64, each with the centre's phase; twice the window's DFT at bins 0 … kept−1 (complex64); Σ w²."""
    g = math.gcd(seg, hop)
    k = np.arange(-SHIFT, kept + SHIFT)
    centre = (g - 1) / 2
    offsets = np.arange(g // 2) + (0.5 if g % 2 == 0 else 1.0)  # m > 0; an odd block's centre (m = 0) apart
    cos = np.cos(2 * np.pi * np.outer(offsets, k) / nfft)
    if g % 2:
        cos = np.vstack([np.ones((1, len(k))), cos])
    sin = np.sin(2 * np.pi * np.outer(offsets, k) / nfft)
    starts = np.arange(seg // g) * g + centre
    phase = np.exp(-2j * np.pi * np.outer(starts, k) / nfft).astype(np.complex64)
    n = np.arange(seg)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * n / seg)  # scipy's periodic "hann"
    w_dft = (w[:, None] * np.exp(-2j * np.pi * np.outer(n, np.arange(kept)) / nfft)).sum(axis=0)
    w_dft = (2 * w_dft).astype(np.complex64)  # doubled, as the segments' windowed DFTs are in _chunk
    tables = (cos.astype(np.float32), sin.astype(np.float32), phase, w_dft)
    for a in tables:
        a.setflags(write=False)
    return (*tables, float(np.sum(w**2)))


def welch_blocks(events: Sequence[np.ndarray], fs: float, seg: int, hop: int, nfft: int, kept: int) -> np.ndarray:
    """Mean one-sided PSD, first ``kept`` bins, of events (channels, samples ≥ seg) sharing a plan that
    ``applies``: (all channels of all events in order, kept) float32.

    Every channel's blocks go into one float32 array with one copy, and each chunk of whole channels is a slice of
    it: few and large array operations, so that a featurise thread holds the GIL little and threads run in
    parallel."""
    tables = _tables(seg, hop, nfft, kept)
    g = math.gcd(seg, hop)
    per_seg, step = seg // g, hop // g
    pieces: list[np.ndarray] = []  # each channel's samples that some segment covers
    counts: list[int] = []  # blocks per channel
    for x in events:
        nb = ((x.shape[1] - seg) // hop) * step + per_seg
        pieces.extend(x[:, : nb * g])
        counts.extend([nb] * x.shape[0])
    blocks = np.concatenate(pieces, dtype=np.float32).reshape(-1, g)
    sizes = np.array(counts)
    starts = np.cumsum(sizes) - sizes
    block_sums = blocks.sum(axis=1, dtype=np.float64)
    mean = (np.add.reduceat(block_sums, starts) / (sizes * g)).astype(np.float32)  # removed: float32 keeps digits
    blocks -= np.repeat(mean, sizes)[:, None]
    block_sums -= np.repeat(mean.astype(np.float64) * g, sizes)  # the sums of what the blocks now hold
    out = np.empty((len(sizes), kept), dtype=np.float32)
    i = 0
    while i < len(sizes):  # a chunk of whole channels per matrix product
        j, size = i + 1, counts[i] * g
        while j < len(sizes) and size + counts[j] * g <= CHUNK_FLOATS:
            size += counts[j] * g
            j += 1
        rows = slice(starts[i], starts[j - 1] + counts[j - 1])
        out[i:j] = _chunk(blocks[rows], block_sums[rows], sizes[i:j], tables, per_seg, step, kept)
        i = j
    out[:, 1 : min(nfft // 2, kept)] *= 2  # one-sided; the Nyquist bin of the even nfft has no mirror
    out /= np.float32(fs * tables[4])
    return out


def _chunk(
    blocks: np.ndarray,
    block_sums: np.ndarray,
    sizes: np.ndarray,
    tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float],
    per_seg: int,
    step: int,
    kept: int,
) -> np.ndarray:
    """Mean power over each channel's segments: (channels, kept), for channels of ``sizes`` blocks, one after
    the other in ``blocks`` (each block's sum in ``block_sums``)."""
    cos, sin, phase, window_dft, _ = tables
    spec = _block_dft(blocks, cos, sin)  # (blocks, K): each block's DFT at bins −2 … kept+1, less the centre's phase
    rows = blocks.shape[0] - per_seg + 1  # every block that can start a segment, across channels too
    x = spec[:rows] * phase[0]
    tmp = np.empty_like(x)
    for b in range(1, per_seg):
        x += np.multiply(spec[b : b + rows], phase[b], out=tmp)
    nseg = (sizes - per_seg) // step + 1
    base = np.cumsum(sizes) - sizes
    first = np.repeat(base, nseg) + (np.arange(int(nseg.sum())) - np.repeat(np.cumsum(nseg) - nseg, nseg)) * step
    x = x[first]
    sums = np.concatenate([[0.0], np.cumsum(block_sums)])
    mean = ((sums[first + per_seg] - sums[first]) / (per_seg * blocks.shape[1])).astype(np.float32)
    # Hann on the 2·seg grid, doubled: 2·X_w[k] = X[k] − (X[k−2] + X[k+2]) / 2; the mean's part, 2·mean·W[k]
    xw = np.add(x[:, :kept], x[:, 2 * SHIFT : 2 * SHIFT + kept])
    xw *= np.float32(-0.5)
    xw += x[:, SHIFT : SHIFT + kept]
    xw -= np.multiply(mean[:, None], window_dft, out=x[:, :kept])  # x is spent: its first columns hold the term
    power = np.square(xw.real)
    power += np.square(xw.imag)
    starts = np.cumsum(nseg) - nseg
    return np.add.reduceat(power, starts, axis=0) / (4 * nseg[:, None].astype(np.float32))


def _block_dft(blocks: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``Σ s_m·cos θm − i·Σ d_m·sin θm`` of every block (rows of ``blocks``): (blocks, K) complex64."""
    g, h = blocks.shape[1], sin.shape[0]
    right, left = blocks[:, g - h :], blocks[:, h - 1 :: -1] if h else blocks[:, :0]  # x[c+m] and x[c−m], m > 0
    if g % 2:
        sums = np.empty((blocks.shape[0], h + 1), dtype=np.float32)
        sums[:, 0] = blocks[:, h]
        np.add(right, left, out=sums[:, 1:])
    else:
        sums = np.add(right, left)
    spec = np.empty((blocks.shape[0], cos.shape[1]), dtype=np.complex64)
    spec.real = sums @ cos
    spec.imag = np.negative(np.subtract(right, left) @ sin)
    return spec
