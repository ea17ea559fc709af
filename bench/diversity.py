"""Counting species: daily and overall Hill numbers of Wingbeat's clusters against a simulated deployment's truth.

Each seed simulates a deployment (``daemon.data.simulate.simulate_deployment``: a species table drawn by the
seed, communities that change by day, species that appear and vanish, diel activity) on an instrument whose
sample rate, wavelengths and noise vary with the seed. Three scenarios train on it without labels:

- ``daemon``: the daemon's first model, exactly as its trainer builds it with the default ``[training]``
  (``epochs_first`` epochs, its batch and warm-up rule, seed 0 + version 1, ``first_restarts`` trainings of
  which the one whose clusters agree best with the others' is kept), on the first 600 events by time; it then
  labels the whole deployment.
- ``retrain``: the daemon's full retrain (version 2), as its trainer builds it (``epochs_full`` epochs, once), on
  every event of the deployment: what serves, and re-labels the history, once novel species have made the daemon
  retrain. Its seed is the version's, so ``--retrain-seeds`` seeds are scored, each as a training of its own.
- ``user``: ``wingbeat train`` on every event of the deployment, given ``--user-epochs`` epochs.

The latent of each training is kept every ``SNAPSHOT`` epochs, so that the kept epoch can be chosen by either
rule (``model.train``'s held-out ELBO, or the label-free clustering criterion of ``model.cluster.cluster_quality``)
without training again. The daemon's rule is ``density+split/elbo``: groups by density in the training events'
features (``model.cluster``'s ``"density"``), split again in the latent, at the held-out ELBO's epoch; ``ward+split/
cluster`` was its rule before. Latents are cached under ``--cache`` (keyed by every setting), so a second run only
clusters. Baselines, fitted on the same training events: PCA(2)+GMM and PCA(10)+GMM, K by BIC (1–20).

Scores per seed: the number of clusters (K), richness error per day (worst day) and overall, mean relative error
of the daily q1 and q2, Spearman ρ of the daily q1 trend, ARI against the true species, and the share of days
whose 95 % interval of estimated q0 (``model.diversity``) covers the true richness. A window's observed Hill
numbers are those of its clusters present (``model.diversity.present``: at least ``present_min(n)`` of its n
events), as ``wingbeat diversity`` reports them.

Usage: python bench/diversity.py [--seeds 10 11 12 13 14 15] [--scenarios daemon retrain user] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import scipy.stats
import sklearn.metrics
import torch
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.data.simulate import COMMUNITIES, SimConfig, hill, simulate_deployment
from daemon.ops.config import Training
from daemon.train.trainer import SPLIT_SILHOUETTE
from model.beta import BetaConfig
from model.cluster import ClusterConfig, cluster_quality, fit_clusterer, most_agreeing
from model.diversity import present, window_summary
from model.spectra import FeatureConfig, featurise_events
from model.train import TrainConfig, batch_size_for, encode_mu, fit
from model.vae import VAE, VAEConfig

SNAPSHOT = 10  # epochs between kept latents
DAY_NS = 86_400 * 10**9
INSTRUMENTS = ((20_800.0, 2, 30.0), (16_000.0, 1, 60.0), (9_600.0, 2, 120.0))  # (fs Hz, channels, noise), by seed
METHODS = {
    "ward": ClusterConfig(),
    "ward+split": ClusterConfig(split_silhouette=SPLIT_SILHOUETTE),  # the daemon's new models before density
    "dp": ClusterConfig(method="dp"),
    "bic": ClusterConfig(method="bic"),
    "modes": ClusterConfig(method="modes"),
    "density": ClusterConfig(method="density"),
    "density+split": ClusterConfig(method="density", split_silhouette=SPLIT_SILHOUETTE),  # the daemon's new models
}
TARGETS = {"richness_day": 1, "richness_all": 1, "q1_err": 0.10, "q2_err": 0.10, "rho": 0.8, "cover": 0.9}


@dataclass(frozen=True)
class Setting:
    seed: int
    days: int = 6
    events: int = 1000
    first_after: int = 600
    user_epochs: int = 300
    community: str = "changing"


def deployment(s: Setting) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Features (events, channels, bins), true species names, day index of each event, and the truth."""
    fs, channels, noise = INSTRUMENTS[s.seed % len(INSTRUMENTS)]
    cfg = SimConfig(events=s.events, seed=s.seed, fs=fs, channels=channels, noise=noise, labelled_fraction=1.0)
    data, truth = simulate_deployment(cfg, s.days, COMMUNITIES[s.community])
    off, ch = data["offsets"], data["channels"]
    events = [data["samples"][off[i] : off[i + 1]].reshape(int(ch[i]), -1) for i in range(len(ch))]
    batch = featurise_events(events, data["fs"], FeatureConfig())
    ok = batch.ok
    day = ((data["t0_ns"] - truth["daily"][0]["start_ns"]) // DAY_NS).astype(np.int64)
    return batch.features[ok], data["label"][ok], day[ok], truth


def train_scenario(x: np.ndarray, scenario: str, s: Setting, restart: int = 0) -> dict[str, np.ndarray]:
    """Train as ``scenario`` does (``restart``: the daemon's first model's restart of that index, its seed as
    ``TrainConfig.restart_seeds`` gives it); (snapshots, events, latent) latents of every event every ``SNAPSHOT``
    epochs and at the end, the ELBO-kept epoch's latent, and the epochs of each."""
    torch.set_num_threads(1)
    t = Training()
    if scenario in ("daemon", "retrain"):
        # the first model is version 1, on the first events; a full retrain (version 2) on every event
        n = min(len(x), s.first_after) if scenario == "daemon" else len(x)
        epochs = t.epochs_first if scenario == "daemon" else t.epochs_full
        seed = t.seed + (1 if scenario == "daemon" else 2) + 100_003 * restart
        cfg = TrainConfig(
            epochs=epochs, batch_size=batch_size_for(n), seed=seed, beta=BetaConfig(warmup=min(25, max(0, epochs // 4)))
        )
    else:
        n, seed = len(x), 0
        cfg = TrainConfig(epochs=s.user_epochs, batch_size=batch_size_for(n), seed=seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32).reshape(len(x), -1))
    torch.manual_seed(seed)
    model = VAE(VAEConfig(n_in=xt.shape[1]))
    snaps: list[np.ndarray] = []
    errs: list[np.ndarray] = []
    at: list[int] = []

    def keep(epoch: int) -> None:
        mu, err = encode_mu(model, xt)
        model.train()
        snaps.append(mu.double().numpy())
        errs.append(err.double().numpy())
        at.append(epoch)

    def on_epoch(st: Any) -> None:
        if (st.epoch + 1) % SNAPSHOT == 0 and st.epoch + 1 < cfg.epochs_for(n):
            keep(st.epoch)

    result = fit(model, xt[:n], cfg, on_epoch=on_epoch)
    mu, err = encode_mu(model, xt)  # the kept (ELBO-selected) weights
    # fit has loaded the kept (ELBO-selected) weights; the snapshots hold the others
    return {
        "snaps": np.stack(snaps),
        "snap_err": np.stack(errs),
        "snap_epochs": np.asarray(at),
        "mu": mu.double().numpy(),
        "err": err.double().numpy(),
        "selected": np.asarray(result.selected_epoch),
        "n_train": np.asarray(n),
    }


def cached_training(x: np.ndarray, scenario: str, s: Setting, cache: Path, restart: int = 0) -> dict[str, np.ndarray]:
    keyed: list[Any] = [asdict(s), scenario, SNAPSHOT, Training().epochs_first] + ([restart] if restart else [])
    keyed += [Training().epochs_full] if scenario == "retrain" else []
    key = hashlib.sha256(json.dumps(keyed).encode()).hexdigest()
    path = cache / f"{scenario}-{s.seed}-{key[:12]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = train_scenario(x, scenario, s, restart)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, allow_pickle=False, **out)
    return out


def gmm_bic(z: np.ndarray, n_train: int, seed: int) -> np.ndarray:
    """Baseline: full-covariance GMM on ``z`` (the first ``n_train`` rows fit), K 1–20 by BIC; labels of all rows."""
    best: tuple[float, GaussianMixture] | None = None
    for k in range(1, 21):
        gm = GaussianMixture(k, covariance_type="full", random_state=seed, reg_covar=1e-6).fit(z[:n_train])
        bic = float(gm.bic(z[:n_train]))
        if best is None or bic < best[0]:
            best = (bic, gm)
    assert best is not None
    return best[1].predict(z)


def baseline(x: np.ndarray, n_train: int, dims: int, seed: int) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    pca = PCA(dims, random_state=seed).fit(flat[:n_train])
    return gmm_bic(pca.transform(flat), n_train, seed)


def q0_interval(counts: np.ndarray, seed: int) -> tuple[float, float]:
    """The 95 % interval of estimated richness, as ``wingbeat diversity`` reports it (``model.diversity``'s
    ``window_summary``: from every count, reaching down to the clusters present)."""
    lo, hi = window_summary(counts, seed, 200)["ci95"]["q0"]
    return float(lo), float(hi)


def counted(counts: np.ndarray, rule: str) -> np.ndarray:
    """The abundances a window's observed Hill numbers are read from: every cluster with an event (``"any"``) or
    the clusters present (``model.diversity.present``, as ``wingbeat diversity`` counts them)."""
    return counts[counts > 0] if rule == "any" else present(counts)


def richness(counts: np.ndarray, rule: str) -> int:
    return len(counted(counts, rule))


def score(pred: np.ndarray, species: np.ndarray, day: np.ndarray, truth: dict[str, Any], rule: str) -> dict[str, Any]:
    """Daily and overall Hill numbers of the clusters ``pred`` (events,) (−1 = novel, not counted) vs the truth."""
    ids = np.unique(pred[pred >= 0])
    out: dict[str, Any] = {"k": len(ids), "ari": float(sklearn.metrics.adjusted_rand_score(species, pred))}
    rich_err, q1e, q2e, q1_est, q1_true, covered = [], [], [], [], [], []
    for d, w in enumerate(truth["daily"]):
        c = np.array([(pred[day == d] == i).sum() for i in ids])
        h, t = hill(counted(c, rule)), w["hill"]
        rich_err.append(richness(c, rule) - t["q0"])
        q1e.append(abs(h["q1"] - t["q1"]) / t["q1"])
        q2e.append(abs(h["q2"] - t["q2"]) / t["q2"])
        q1_est.append(h["q1"])
        q1_true.append(t["q1"])
        lo, hi = q0_interval(c[c > 0], d)
        covered.append(lo <= t["q0"] <= hi)
    c_all = np.array([(pred == i).sum() for i in ids])
    out["richness_day"] = int(max(rich_err, key=abs))
    out["richness_all"] = richness(c_all, rule) - int(truth["overall"]["hill"]["q0"])
    out["q1_err"] = float(np.mean(q1e))
    out["q2_err"] = float(np.mean(q2e))
    rho = scipy.stats.spearmanr(q1_est, q1_true).statistic if np.ptp(q1_est) > 0 else 0.0
    out["rho"] = float(rho) if np.isfinite(rho) else 0.0
    out["cover"] = float(np.mean(covered)) if covered else None
    return out


def met(row: dict[str, Any]) -> dict[str, bool | None]:
    return {
        "richness_day": abs(row["richness_day"]) <= TARGETS["richness_day"],
        "richness_all": abs(row["richness_all"]) <= TARGETS["richness_all"],
        "q1_err": row["q1_err"] <= TARGETS["q1_err"],
        "q2_err": row["q2_err"] <= TARGETS["q2_err"],
        "rho": row["rho"] >= TARGETS["rho"],
        "cover": None if row["cover"] is None else row["cover"] >= TARGETS["cover"],
    }


def pick_snapshot(tr: dict[str, np.ndarray], cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """The snapshot (after warm-up) whose training events cluster best by ``cluster_quality``: latent, error, epoch.
    As ``model.train``'s ``select="cluster"``: a latent with no active dimension is no candidate, and with no
    candidate the last snapshot is kept."""
    n = int(tr["n_train"])
    best = (-np.inf, len(tr["snap_epochs"]) - 1)
    for i, ep in enumerate(tr["snap_epochs"]):
        if ep < 25:
            continue
        q = cluster_quality(tr["snaps"][i][:n], replace(cfg, ward_events=TrainConfig.select_events))
        if q > best[0]:
            best = (q, i)
    i = best[1]
    return tr["snaps"][i], tr["snap_err"][i], int(tr["snap_epochs"][i])


def run_seed(
    s: Setting,
    scenarios: list[str],
    methods: dict[str, ClusterConfig],
    cache: Path,
    rule: str,
    selects: tuple[str, ...] = ("elbo", "cluster"),
    baselines: bool = True,
    restarts: int = Training().first_restarts,
    retrain_seeds: int = 3,
) -> list[dict]:
    x, species, day, truth = deployment(s)
    rows = []
    fitted: dict[tuple[int, int], np.ndarray] = {}  # baselines by (training events, dims): retrain and user share
    for scenario in scenarios:
        # the daemon's first model: ``training.first_restarts`` trainings, the one whose clusters of the training
        # events agree best with the others' kept (``model.build``); the user's training: one; the daemon's full
        # retrain: one, whose seed (the version's) is arbitrary, so each of ``retrain_seeds`` seeds scores alone
        if scenario == "daemon":
            sets = [[cached_training(x, scenario, s, cache, r) for r in range(restarts)]]
        else:
            sets = [
                [cached_training(x, scenario, s, cache, r)]
                for r in range(retrain_seeds if scenario == "retrain" else 1)
            ]
        for i, runs in enumerate(sets):
            rows += [
                {**r, "training": i}
                for r in score_runs(runs, s, scenario, methods, selects, species, day, truth, rule, x)
            ]
        n = int(sets[0][0]["n_train"])
        base = {"seed": s.seed, "scenario": scenario, "species": len(truth["species"])}
        base["species_train"] = len(np.unique(species[:n]))
        for dims in (2, 10) if baselines else ():
            if (n, dims) not in fitted:
                fitted[n, dims] = baseline(x, n, dims, s.seed)
            pred = fitted[n, dims]
            row = {**base, "method": f"PCA({dims})+GMM", "epoch": -1, "k_model": len(np.unique(pred[:n]))}
            row.update(score(pred, species, day, truth, rule))
            row["ari_train"] = float(sklearn.metrics.adjusted_rand_score(species[:n], pred[:n]))
            rows.append(row)
    return rows


def clusterer_seed(scenario: str, seed: int) -> int:
    """The clusterer's seed: the daemon's trainer gives it the version's training seed (``model.build`` keeps it
    for every restart), version 1 for the first model and 2 for the full retrain; the user's training, ``seed``."""
    return {"daemon": Training().seed + 1, "retrain": Training().seed + 2}.get(scenario, seed)


def kept_model(
    runs: list[dict[str, np.ndarray]],
    cfg: ClusterConfig,
    select: str,
    pick_seed: int,
    fit_seed: int,
    features: np.ndarray | None = None,
) -> tuple[int, np.ndarray, int, int]:
    """The clusters a model trained as ``runs`` publishes, cut by ``cfg`` at the epoch ``select`` keeps ("elbo" or
    "cluster"): of several trainings the one whose clusters of the training events agree best with the others'
    (``model.build``). ``features``: every event's (the first ``n_train`` trained on), for ``"density"``. Returns
    K, the cluster of every event, the kept epoch and the kept training."""
    n = int(runs[0]["n_train"])
    train_features = None if features is None else features[:n]
    fits = []
    for tr in runs:
        if select == "elbo":
            mu, err, epoch = tr["mu"], tr["err"], int(tr["selected"])
        else:
            mu, err, epoch = pick_snapshot(tr, replace(cfg, seed=pick_seed))
        cl = fit_clusterer(mu[:n], err[:n], replace(cfg, seed=fit_seed), features=train_features)
        fits.append((cl.k, cl.assign(mu, err).cluster, epoch))
    kept = most_agreeing([pred[:n] for _, pred, _ in fits])[0]
    return (*fits[kept], kept)


def score_runs(
    runs: list[dict[str, np.ndarray]],
    s: Setting,
    scenario: str,
    methods: dict[str, ClusterConfig],
    selects: tuple[str, ...],
    species: np.ndarray,
    day: np.ndarray,
    truth: dict[str, Any],
    rule: str,
    features: np.ndarray | None = None,
) -> list[dict]:
    """One row per clusterer and kept-epoch rule of a model trained as ``runs`` (several: the most agreeing kept);
    ``features`` of every event, for ``"density"``."""
    rows = []
    n = int(runs[0]["n_train"])
    k_train = len(np.unique(species[:n]))
    base = {"seed": s.seed, "scenario": scenario, "species": len(truth["species"]), "species_train": k_train}
    for name, cfg in methods.items():
        for select in selects:
            k, pred, epoch, kept = kept_model(runs, cfg, select, s.seed, clusterer_seed(scenario, s.seed), features)
            row = {**base, "method": f"{name}/{select}", "epoch": epoch, "k_model": k, "restart": kept}
            row.update(score(pred, species, day, truth, rule))
            row["ari_train"] = float(sklearn.metrics.adjusted_rand_score(species[:n], pred[:n]))
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'scenario':8} {'method':21} {'seed':>4} {'sp':>3} {'spT':>3} {'K':>3} {'ΔS day':>6} {'ΔS all':>6} "
        f"{'q1 err':>7} {'q2 err':>7} {'ρ q1':>6} {'cover':>6} {'ARI':>6} {'ARItr':>6} {'ep':>4}"
    )
    lines = [head]
    for r in rows:
        m = met(r)
        flag = "".join("✓" if v else ("·" if v is None else "✗") for v in m.values())
        cover = "  n/a" if r["cover"] is None else f"{r['cover']:6.2f}"
        lines.append(
            f"{r['scenario']:8} {r['method']:21} {r['seed']:4d} {r['species']:3d} {r['species_train']:3d} "
            f"{r['k_model']:3d} {r['richness_day']:+6d} {r['richness_all']:+6d} {r['q1_err']:7.1%} {r['q2_err']:7.1%} "
            f"{r['rho']:6.2f} {cover} {r['ari']:6.3f} {r['ari_train']:6.3f} {r['epoch']:4d}  {flag}"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    """Per scenario and method over seeds: mean, worst and best of the main figures; targets met on every seed."""
    lines = [
        f"{'scenario':8} {'method':21} {'|ΔS day| mean/worst':>20} {'q1 err mean/worst':>18} {'q2 err mean':>11} "
        f"{'ρ worst':>7} {'ARI mean/worst/best':>20} {'all targets':>11}"
    ]
    keys = dict.fromkeys((r["scenario"], r["method"]) for r in rows)
    for sc, me in keys:
        rs = [r for r in rows if r["scenario"] == sc and r["method"] == me]
        day = [abs(r["richness_day"]) for r in rs]
        ari = [r["ari"] for r in rs]
        ok = sum(all(v is not False for v in met(r).values()) for r in rs)
        lines.append(
            f"{sc:8} {me:21} {np.mean(day):10.2f}/{max(day):<9d} {np.mean([r['q1_err'] for r in rs]):9.1%}/"
            f"{max(r['q1_err'] for r in rs):<8.1%} {np.mean([r['q2_err'] for r in rs]):11.1%} "
            f"{min(r['rho'] for r in rs):7.2f} {np.mean(ari):8.3f}/{min(ari):.3f}/{max(ari):.3f} "
            f"{ok:>5d} of {len(rs)}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14, 15])
    p.add_argument(
        "--scenarios", nargs="+", default=["daemon", "retrain", "user"], choices=["daemon", "retrain", "user"]
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["ward", "ward+split", "density+split"],
        choices=sorted(METHODS),
        help="clusterers to score: model.cluster's methods (ward, dp, bic, modes, density), ward+split (groups split "
        f"again, split_silhouette {SPLIT_SILHOUETTE}: the daemon's new models before density+split) and "
        "density+split (groups by density in the features, split again: the daemon's first model and full "
        "retrains, with the held-out ELBO's epoch)",
    )
    p.add_argument(
        "--select",
        nargs="+",
        default=["elbo", "cluster"],
        choices=["elbo", "cluster"],
        help="kept epoch: held-out ELBO (model.train's select=best) or cluster_quality (select=cluster)",
    )
    p.add_argument("--no-baselines", action="store_true", help="leave out PCA+GMM")
    p.add_argument(
        "--first-restarts",
        type=int,
        default=Training().first_restarts,
        help="trainings of the daemon's first model, the most agreeing kept (the default: training.first_restarts)",
    )
    p.add_argument(
        "--retrain-seeds",
        type=int,
        default=3,
        help="the daemon's full retrain is trained once from the version's seed; score this many seeds, each alone",
    )
    p.add_argument("--days", type=int, default=6)
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--user-epochs", type=int, default=300)
    p.add_argument("--richness", choices=["present", "any"], default="present", help="richness counting rule")
    p.add_argument("--cache", type=Path, default=ROOT / "out" / "diversity-cache")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    methods = {m: METHODS[m] for m in a.methods}
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for seed in a.seeds:
        s = Setting(seed=seed, days=a.days, events=a.events, user_epochs=a.user_epochs)
        rows += run_seed(
            s,
            a.scenarios,
            methods,
            a.cache,
            a.richness,
            tuple(a.select),
            not a.no_baselines,
            a.first_restarts,
            a.retrain_seeds,
        )
        print(f"seed {seed} done at {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(rows))
    print()
    print(summary(rows))
    print(
        f"\ntargets (flags in order ΔS day, ΔS all, q1, q2, ρ, cover; ✓ met, ✗ not, · not measured): "
        f"|ΔS| ≤ {TARGETS['richness_day']} every day and overall, q1/q2 error ≤ {TARGETS['q1_err']:.0%}, "
        f"ρ ≥ {TARGETS['rho']}, q0 interval coverage ≥ {TARGETS['cover']:.0%}; daemon's first model: "
        "K within 2 of the species in its training events (spT), ARI ≥ PCA(2)+GMM − 0.05"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
