"""One PNG that shows a model version: latent space, training curves, spectra and reconstructions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model.checkpoint import ModelVersion


def to_plane(mu: np.ndarray) -> np.ndarray:
    """Points (n, d) as (n, 2): as they are for d = 2, padded for d = 1, on their two principal axes for d > 2."""
    if mu.shape[1] == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))])
    if mu.shape[1] == 2 or len(mu) < 2:
        return mu[:, :2]
    centred = mu - mu.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def draw_cards(ax: Any, cards: list[dict[str, Any]], freqs: np.ndarray) -> None:
    """Mean spectrum per cluster (model.cards), offset one above the other, f0 and its harmonics marked."""
    if not cards:
        ax.text(0.5, 0.5, "no cluster cards in this version", ha="center", va="center", transform=ax.transAxes)
        return
    for row, card in enumerate(cards):
        colour = f"C{row % 10}"
        mean = np.asarray(card["mean_spectrum"])  # (channels, bins)
        for ch, spectrum in enumerate(mean):
            ax.plot(freqs, spectrum + row, color=colour, lw=0.9, ls=("-", "--", ":")[ch % 3])
        if card["f0_hz"] is not None:
            f0 = card["f0_of_mean_hz"]
            ax.vlines(f0 * np.arange(1, 5), row, row + 1, color=colour, lw=0.6, alpha=0.5)
            ax.plot([f0], [row + 1], marker="v", color=colour)
            label = f"{card['cluster']}: f0 {card['f0_hz']:.0f} Hz, n = {card['size']}"
        else:
            label = f"{card['cluster']}: no f0 above 40 Hz, n = {card['size']}"
        ax.text(freqs[-1], row + 0.5, " " + label, va="center", fontsize=7, color=colour)
    ax.set_xlim(freqs[0], freqs[-1] * 1.25)  # room for the labels on the right
    ax.set_xlabel("frequency (Hz)")
    ax.set_ylabel("cluster (offset); channels: solid, dashed")
    ax.set_yticks([])
    ax.set_title("mean spectrum per cluster; ▼ estimated wing-beat f0, lines at its first 4 harmonics")


def render(version: ModelVersion, features: np.ndarray | None, labels: np.ndarray | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from model.predict import predict

    hist = version.manifest.get("history", {})
    fig = plt.figure(figsize=(13, 15))
    grid = fig.add_gridspec(3, 2)
    axes: list[Any] = [fig.add_subplot(grid[i // 2, i % 2]) for i in range(4)]
    ax_c, ax_l, ax_curves, ax_spec = axes
    draw_cards(fig.add_subplot(grid[2, :]), version.manifest.get("cards", []), version.features.grid)
    if features is not None and len(features):
        rng = np.random.default_rng(0)
        show = rng.choice(len(features), min(len(features), 5000), replace=False)
        pred = predict(version, features[show])
        mu = to_plane(pred.latent)
        sc = ax_c.scatter(mu[:, 0], mu[:, 1], c=pred.cluster, cmap="tab20", s=4)
        ax_c.legend(*sc.legend_elements(num=None), title="cluster", fontsize=7, loc="best", markerscale=0.8)
        if labels is not None and (labels[show] != "").any():
            lab = labels[show]
            names = sorted(set(lab.tolist()) - {""})
            for i, name in enumerate(names):
                m = lab == name
                ax_l.scatter(mu[m, 0], mu[m, 1], s=4, color=plt.cm.tab20(i % 20), label=name)
            ax_l.legend(fontsize=7, markerscale=3, loc="best")
            ax_l.set_title("latent μ by label")
        else:
            ax_l.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax_l.transAxes)
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(features[show[:4]], np.float32).reshape(len(show[:4]), -1))
            mu_t, _ = version.model.encode(x)
            recon = version.model.decode(mu_t).numpy()
        n_in = x.shape[1]
        for i in range(len(x)):
            ax_spec.plot(np.arange(n_in), x[i].numpy() + i, color="tab:blue", lw=0.8)
            ax_spec.plot(np.arange(n_in), recon[i] + i, color="tab:orange", lw=0.8)
        ax_spec.set_title("spectra (blue) and reconstructions (orange), offset")
        ax_spec.set_xlabel("input bin (channels back to back)")
    else:
        means = to_plane(version.clusterer.cluster_means)
        ax_c.scatter(means[:, 0], means[:, 1], c=version.clusterer.ids, cmap="tab20")
        for ident, m in zip(version.clusterer.ids, means, strict=True):
            ax_c.annotate(str(ident), m)
        ax_l.text(0.5, 0.5, "give a data set to see events", ha="center", va="center", transform=ax_l.transAxes)
        ax_spec.text(
            0.5, 0.5, "give a data set to see reconstructions", ha="center", va="center", transform=ax_spec.transAxes
        )
    d = version.model.cfg.latent_dim
    plane = "" if d <= 2 else f"\n{d}-D latent on its two principal axes"
    ax_c.set_title(f"latent μ by cluster ({version.clusterer.k} clusters; −1 = novel){plane}")
    if hist.get("rec"):
        ep = np.arange(len(hist["rec"]))
        ax_curves.plot(ep, hist["rec"], label="L_rec (train)")
        ax_curves.plot(ep, hist["kl"], label="L_KL (train)")
        ax_curves.plot(ep, [np.nan if v is None else v for v in hist["val_rec"]], label="L_rec (held out)", lw=0.8)
        ax_curves.set_yscale("log")
        ax_curves.set_xlabel("epoch")
        ax_curves.axvline(version.manifest.get("selected_epoch", 0), color="grey", ls=":", label="kept epoch")
        twin = ax_curves.twinx()
        twin.plot(ep, hist["beta"], color="tab:red", label="β")
        twin.plot(ep, hist["gamma"], color="tab:purple", label="γ")
        twin.set_ylabel("β, γ")
        lines = ax_curves.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax_curves.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
    ax_curves.set_title("training")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
