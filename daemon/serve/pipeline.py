"""The pipeline: a decoded micro-batch and the serving model in; rows to store, quarantine rows, acks and outputs
out. Pure: no sockets, no clock, no SQLite. The serving loop (``daemon.serve.service``) stores what ``process`` returns,
then gives the new event IDs to ``settle`` for the acks and the outputs to publish.

Featurising (Welch) is the costly step; ``Featuriser`` runs it for batch N+1 in threads while batch N commits
(numpy and scipy.fft release the GIL), and the serving thread makes what is still queued when it needs the features.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from daemon.protocol import REFUSED, Ack, Decoded, Event, Output, Quarantined, Received, Reject, Settled
from model.checkpoint import ModelVersion
from model.cluster import NOVEL
from model.predict import predict
from model.spectra import FeatureConfig, FeatureError, featurise_events

SPLIT_FROM = 32  # events in a batch from which featurising is split in parts (threads + 1)


@dataclass
class Featurised:
    """Features of a batch's events by index, and why the others have none."""

    features: dict[int, np.ndarray] = field(default_factory=dict)  # (channels, bins) float32
    failed: dict[int, FeatureError] = field(default_factory=dict)

    def update(self, other: Featurised) -> None:
        self.features.update(other.features)
        self.failed.update(other.failed)


def featurise(events: list[tuple[Received, Event]], cfg: FeatureConfig, lo: int, hi: int) -> Featurised:
    """Features of events ``lo``…``hi``−1 of a batch; one Welch call per channel count."""
    out = Featurised()
    by_channels: dict[int, list[int]] = {}
    for i in range(lo, hi):
        by_channels.setdefault(events[i][1].channels, []).append(i)
    for idx in by_channels.values():
        fb = featurise_events([events[i][1].samples for i in idx], [events[i][1].fs for i in idx], cfg)
        for row, i in enumerate(idx):
            if fb.ok[row]:
                out.features[i] = fb.features[row]
            else:
                out.failed[i] = fb.errors[row]
    return out


@dataclass
class Job:
    """A decoded batch whose features are being made, in parts: part k is events ``cuts[k]`` … ``cuts[k + 1]`` − 1,
    queued for the featurise threads, being made, or made."""

    decoded: Decoded
    cfg: FeatureConfig
    cuts: list[int]
    parts: list[Future[Featurised]]

    def featurised(self) -> Featurised:
        """The batch's features. The parts no thread has started yet are made here, last first (the threads take
        them first first), so the serving thread works instead of waiting for a thread to get to them."""
        made: dict[int, Featurised] = {}
        for k in reversed(range(len(self.parts))):
            if not self.parts[k].cancel():  # started or done, and so is every part before it
                break
            made[k] = featurise(self.decoded.events, self.cfg, self.cuts[k], self.cuts[k + 1])
        out = Featurised()
        for k, f in enumerate(self.parts):
            out.update(made[k] if k in made else f.result())
        return out


class Featuriser:
    """``threads`` featurise threads (0 = featurise on the serving thread). A small batch while nothing else is in
    flight is featurised at once on the serving thread: a hand-off to a thread and back only adds latency. Any other
    batch is queued for the threads, a large one (``SPLIT_FROM`` events or more) in one part more than there are
    threads; when the serving thread needs the batch, it makes the parts still queued itself (``Job.featurised``).
    So the serving thread is a featurise worker whenever it would otherwise wait, and no more threads compute than
    the daemon has cores."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="featurise") if threads > 0 else None

    def start(self, decoded: Decoded, cfg: FeatureConfig, busy: bool) -> Job:
        n = len(decoded.events)
        parts = self.threads + 1 if n >= SPLIT_FROM else 1
        if self.pool is None or (parts == 1 and not busy):
            done: Future[Featurised] = Future()
            done.set_result(featurise(decoded.events, cfg, 0, n))
            return Job(decoded, cfg, [0, n], [done])
        cuts = [n * k // parts for k in range(parts + 1)]
        queued = [self.pool.submit(featurise, decoded.events, cfg, cuts[k], cuts[k + 1]) for k in range(parts)]
        return Job(decoded, cfg, cuts, queued)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


@dataclass
class Processed:
    """What one batch asks of the store, the senders and the subscribers."""

    events: list[tuple[Received, Event]]  # to store, with …
    features: list[np.ndarray]  # … their features
    quarantine: list[Quarantined]
    acks: list[Ack]  # for rejected messages and in-batch duplicates; the stored ones are acked by ``settle``
    rejects: list[tuple[Received, Reject]]  # for metrics and logs
    outputs: list[Output] | None  # one per event (event_id 0 until committed), or None: the backlog path serves


def process(
    job: Decoded,
    featurised: Featurised,
    model: ModelVersion | None,
    version: int,
    caught_up: bool,
    frame_cap: int,
) -> Processed:
    """Split a featurised batch into what to store and what to refuse, and predict its outputs when a model
    serves and nothing older waits for one (``caught_up``): then the outputs are stored with the events."""
    rejects = list(job.rejects)
    events: list[tuple[Received, Event]] = []
    feats: list[np.ndarray] = []
    for i, (r, e) in enumerate(job.events):
        err = featurised.failed.get(i)
        if err is not None:
            rejects.append((r, Reject("featurise", err.detail, e.sensor, e.seq)))
        else:
            events.append((r, e))
            feats.append(featurised.features[i])
    quarantine = [
        Quarantined(
            j.reason, j.detail, j.sensor, j.seq, b"\x00".join(f[:frame_cap] for f in r.frames)[:frame_cap], r.endpoint
        )
        for r, j in rejects
    ]
    acks = [Ack(r, j.sensor, j.seq, "rejected", j.reason) for r, j in rejects]
    acks += [Ack(r, e.sensor, e.seq, "duplicate") for r, e in job.duplicates]
    outputs = None
    if model is not None and caught_up and events and all(f.size == model.model.cfg.n_in for f in feats):
        info = [(0, e.sensor, e.seq, e.t0_ns) for _, e in events]
        outputs = outputs_for(model, version, info, np.stack([f.reshape(-1) for f in feats]), np.ones(len(feats), bool))
    return Processed(events, feats, quarantine, acks, rejects, outputs)


def settle(p: Processed, ids: list[int]) -> Settled:
    """After the commit: ID −1 means the store had that ``(sensor, seq)`` already (a resend); ``REFUSED`` (−2)
    that the store could not hold the event and quarantined it: rejected, for good."""
    stored: list[tuple[Received, Event, int]] = []
    acks = list(p.acks)
    outputs: list[Output] = []
    refused: list[tuple[Received, Reject]] = []
    for k, ((r, e), eid) in enumerate(zip(p.events, ids, strict=True)):
        if eid == REFUSED:
            refused.append((r, Reject("store", "the store could not hold it; quarantined", e.sensor, e.seq)))
            acks.append(Ack(r, e.sensor, e.seq, "rejected", "store"))
            continue
        if eid < 0:
            acks.append(Ack(r, e.sensor, e.seq, "duplicate"))
            continue
        stored.append((r, e, eid))
        acks.append(Ack(r, e.sensor, e.seq, "stored"))
        if p.outputs is not None:
            o = p.outputs[k]  # with its event ID (a constructor call: dataclasses.replace costs twice as much)
            outputs.append(Output(eid, o.sensor, o.seq, o.t0_ns, o.model_version, o.cluster, o.probability,
                                  o.novelty, o.rec_error, o.latent))  # fmt: skip
    return Settled(stored, acks, outputs, refused)


def outputs_for(
    model: ModelVersion, version: int, events: list[tuple[int, str, int, int]], x: np.ndarray, ok: np.ndarray
) -> list[Output]:
    """The one place outputs are built, live and for the backlog. ``events``: (event ID, sensor, seq, t0_ns);
    ``x``: (events, n_in) features; events not ``ok`` (features of another channel count than the model's) get
    no cluster."""
    pred = predict(model, x[ok]) if ok.any() else None
    out: list[Output] = []
    # Python numbers for the whole batch at once (``tolist``): the same values as per-element int() / float(),
    # without a numpy scalar for each
    cols = (
        zip(
            pred.cluster.tolist(),
            pred.probability.tolist(),
            pred.novelty.tolist(),
            pred.rec_error.tolist(),
            pred.latent.tolist(),
            strict=True,
        )
        if pred is not None
        else iter(())
    )
    for (eid, sensor, seq, t0), good in zip(events, ok.tolist(), strict=True):
        if good and pred is not None:
            cluster, probability, novelty, rec_error, latent = next(cols)
            out.append(Output(eid, sensor, seq, t0, version, cluster, probability, novelty, rec_error, tuple(latent)))
        else:
            out.append(Output(eid, sensor, seq, t0, version, NOVEL, 0.0, 1e9, 1e9, ()))
    return out
