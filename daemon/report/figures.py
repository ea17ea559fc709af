"""The report's figures: matplotlib drawn to inline SVG text, so that the page needs nothing from outside (no
font, image or script is fetched: text stays text, in the page's own font). Arrays in, SVG strings out; the page
itself is ``daemon.report.html``.

Colours follow the cluster IDs (``colour``), the same in every figure of a page."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

plt.rcParams.update(
    {
        "svg.fonttype": "none",  # text as <text>, drawn in the page's font: no embedded glyphs, small files
        "svg.hashsalt": "wingbeat",  # the same data draws the same SVG
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    }
)
NOVEL_COLOUR = "#9a9a9a"


def colour(cluster: int, order: Sequence[int]) -> Any:
    """The colour of ``cluster`` (novel, −1, is grey) given the page's cluster ``order``."""
    if cluster < 0:
        return NOVEL_COLOUR
    return plt.get_cmap("tab20")(order.index(cluster) % 20 if cluster in order else 19)


def svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element (no XML declaration or DOCTYPE: it sits inside HTML)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def card(mean_spectrum: np.ndarray, freqs: np.ndarray, f0: float | None, cluster: int, order: Sequence[int]) -> str:
    """One cluster's mean feature spectrum per channel (solid, dashed, dotted), its f0 (▼) and harmonics (lines).

    Parameters
    ----------
    mean_spectrum : (channels, bins) scaled log power.
    freqs : (bins,) Hz.
    f0 : the wing-beat fundamental of the mean spectrum in Hz, or None when the card has none.
    """
    fig, ax = plt.subplots(figsize=(3.6, 1.9))
    c = colour(cluster, order)
    for ch, spectrum in enumerate(np.asarray(mean_spectrum)):
        ax.plot(freqs, spectrum, color=c, lw=1.0, ls=("-", "--", ":")[ch % 3], label=f"channel {ch}")
    if f0:
        for k in range(1, 5):
            if k * f0 <= freqs[-1]:
                ax.axvline(k * f0, color="k", lw=0.6, alpha=0.35 if k > 1 else 0.8, ls="-" if k == 1 else ":")
        ax.plot([f0], [1.02], marker="v", color="k", clip_on=False)
    ax.set_xlim(freqs[0], freqs[-1])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("frequency (Hz)")
    ax.set_ylabel("scaled log power")
    return svg(fig)


def abundance(days: list[str], counts: np.ndarray, clusters: list[int], order: Sequence[int]) -> str:
    """Events per day stacked by cluster.

    Parameters
    ----------
    days : (days,) labels, YYYY-MM-DD.
    counts : (days, clusters) events.
    clusters : the columns' cluster IDs.
    """
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(days))
    bottom = np.zeros(len(days))
    for j, c in enumerate(clusters):
        ax.bar(x, counts[:, j], bottom=bottom, color=colour(c, order), width=0.85, label="novel" if c < 0 else str(c))
        bottom += counts[:, j]
    step = max(1, len(days) // 14)
    ax.set_xticks(x[::step], days[::step], rotation=30, ha="right")
    ax.set_ylabel("events per day")
    ax.legend(title="cluster", fontsize=7, ncols=max(1, len(clusters) // 8), loc="upper left", bbox_to_anchor=(1, 1))
    return svg(fig)


def diel(counts: np.ndarray, clusters: list[int]) -> str:
    """Activity by hour of day (UTC) and cluster: each cluster's row is its share of its own events per hour.

    Parameters
    ----------
    counts : (clusters, 24) events.
    """
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.28 * len(clusters)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest", extent=(0, 24, len(clusters), 0))
    ax.set_yticks(np.arange(len(clusters)) + 0.5, ["novel" if c < 0 else str(c) for c in clusters])
    ax.set_xticks(range(0, 25, 3))
    ax.set_xlabel("hour of day (UTC)")
    ax.set_ylabel("cluster")
    fig.colorbar(im, ax=ax, label="share of the cluster's events", fraction=0.03, pad=0.01)
    return svg(fig)


def hill(days: list[str], windows: list[dict[str, Any]]) -> str:
    """Hill numbers q = 0, 1, 2 per day: observed (dots) and estimated (line) with the 95 % interval (band).

    ``windows``: one dict per day with ``observed``, ``estimated`` and ``ci95`` (``{"q0": [lo, hi], …}``)."""
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(days))
    for q, c in (("q0", "C0"), ("q1", "C1"), ("q2", "C2")):
        obs = np.array([w["observed"][q] for w in windows], float)
        est = np.array([_get(w.get("estimated"), q) for w in windows], float)
        ci = np.array([_get(w.get("ci95"), q, [np.nan, np.nan]) for w in windows], float).reshape(len(windows), 2)
        ax.fill_between(x, ci[:, 0], ci[:, 1], color=c, alpha=0.18, lw=0)
        ax.plot(x, est, color=c, lw=1.2, label=f"q = {q[1]} estimated, 95 % interval")
        ax.plot(x, obs, "o", color=c, ms=3, label=f"q = {q[1]} observed")
    step = max(1, len(days) // 14)
    ax.set_xticks(x[::step], days[::step], rotation=30, ha="right")
    ax.set_ylabel("effective number of clusters")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncols=3, loc="upper left", bbox_to_anchor=(0, -0.32))
    return svg(fig)


def _get(d: dict[str, Any] | None, key: str, default: Any = np.nan) -> Any:
    v = (d or {}).get(key)
    return default if v is None else v


def rarefaction(curve: dict[str, Any]) -> str:
    """Hill numbers q = 0, 1, 2 against sample size: rarefied (solid) up to the observed size, extrapolated
    (dashed) beyond, the observed sample marked.

    ``curve``: ``sizes`` (n,) events, ``q0``, ``q1``, ``q2`` (n,), and ``observed_size`` (events)."""
    sizes = np.asarray(curve["sizes"], float)
    n = float(curve["observed_size"])
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for q, c in (("q0", "C0"), ("q1", "C1"), ("q2", "C2")):
        y = np.asarray(curve[q], float)
        ax.plot(sizes[sizes <= n], y[sizes <= n], color=c, lw=1.4, label=f"q = {q[1]}")
        ax.plot(sizes[sizes >= n], y[sizes >= n], color=c, lw=1.4, ls="--")
        ax.plot([n], [np.interp(n, sizes, y)], "o", color=c, ms=4)
    ax.axvline(n, color="k", lw=0.5, ls=":")
    ax.set_xlabel(f"events (observed: {int(n)}; dashed: extrapolated)")
    ax.set_ylabel("effective number of clusters")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="lower right")
    return svg(fig)


def dissimilarity(matrix: np.ndarray, stations: list[str], metric: str) -> str:
    """Station × station dissimilarity (0 = the same composition, 1 = nothing shared), values written in."""
    m = np.asarray(matrix, float)
    k = len(stations)
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * k, 1.2 + 0.55 * k))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma_r")
    ax.set_xticks(range(k), stations, rotation=30, ha="right")
    ax.set_yticks(range(k), stations)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if m[i, j] > 0.5 else "k")
    fig.colorbar(im, ax=ax, label=metric, fraction=0.05)
    return svg(fig)
