"""Re-labelling the stored history with the serving version, in the background.

Each model version numbers its clusters its own way, so a window whose events two versions labelled mixes two
partitions. When a version starts serving, ``Relabeller`` starts ``python -m daemon.serve.relabel`` for it: a
process at idle priority (SCHED_IDLE, else nice 19, one torch thread) that reads the stored features of the events
another version served, in event order, and writes the serving version's clusters into ``labels`` in short
transactions. It never blocks ingest: the serving loop's commits wait at most for one short transaction, and the
process only gets a core nothing else wants. It resumes where it stopped (the highest event ID labelled by the
version is the watermark), and when it has caught up it drops the labels of other versions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from daemon.ops import logs
from daemon.store.db import Store
from model.checkpoint import ModelVersion
from model.cluster import NOVEL
from model.predict import predict

READ_BATCH = 32_768  # events read and predicted at once
WRITE_BATCH = 8_192  # labels a transaction: the serving loop's commit waits for at most one of these


def relabel(
    store: Store,
    model: ModelVersion,
    version: int,
    *,
    batch: int = READ_BATCH,
    keep_going: Callable[[], bool] = lambda: True,
) -> int:
    """Label, with ``model`` (served as ``version``), every stored event another version served that it has not
    labelled yet; return the events labelled. Events whose features do not fit the model (another channel count)
    are labelled novel, as the serving path does."""
    n_in = model.model.cfg.n_in
    done = 0
    after = store.relabelled_to(version)
    while keep_going():
        todo = store.relabel_todo(version, after, batch, n_in)
        if len(todo.ids) == 0:
            break
        clusters = np.full(len(todo.ids), NOVEL, np.int64)
        if todo.ok.any():
            clusters[todo.ok] = predict(model, todo.x[todo.ok]).cluster
        for lo in range(0, len(todo.ids), WRITE_BATCH):
            store.add_labels(version, todo.ids[lo : lo + WRITE_BATCH], clusters[lo : lo + WRITE_BATCH])
        after = int(todo.ids[-1])
        done += len(todo.ids)
    return done


class Relabeller:
    """The serving loop's handle on the re-labelling process: one at a time, for the version that serves."""

    def __init__(self, state: Path, store: Store) -> None:
        self.state, self.store = state, store
        self.proc: subprocess.Popen[bytes] | None = None
        self.retired: list[subprocess.Popen[bytes]] = []  # asked to stop at a swap, not waited for
        self.version = 0

    def serving(self, version: int) -> None:
        """A version starts serving: stop re-labelling for the one before, start it for this one (when another
        version served an event it has not labelled). The old process is asked to stop and not waited for: the
        serving loop goes on at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.retired.append(self.proc)
        self.retired = [p for p in self.retired if p.poll() is None]
        self.proc = None
        self.version = version
        if not self.store.relabel_needed(version):
            return
        cmd = [sys.executable, "-m", "daemon.serve.relabel", "--state", str(self.state), "--version", str(version)]
        cmd += ["--parent-pid", str(os.getpid())]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 2.0) -> None:
        """SIGTERM (it stops after the batch in hand), then SIGKILL after ``timeout_s`` (at idle priority on a busy
        machine the batch may take long; its committed transactions stay, the one in flight rolls back)."""
        procs = [*self.retired, *([self.proc] if self.proc is not None else [])]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout_s)
        self.proc, self.retired = None, []


def _idle_priority() -> str:
    """SCHED_IDLE where the kernel allows it, else nice 19: re-labelling runs only on a core nothing else wants."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (OSError, AttributeError):
        os.nice(19)
        return "nice 19"


def main(argv: list[str] | None = None) -> int:
    import signal

    import torch

    from daemon.store.versions import read_version

    ap = argparse.ArgumentParser(prog="python -m daemon.serve.relabel")
    ap.add_argument("--state", type=Path, required=True)
    ap.add_argument("--version", type=int, required=True)
    ap.add_argument("--parent-pid", type=int, default=0)
    args = ap.parse_args(argv)
    logs.configure()
    log = logs.get(model_version=args.version)
    priority = _idle_priority()
    torch.set_num_threads(1)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    parent = args.parent_pid or os.getppid()
    store = Store(args.state)
    store.db.execute("PRAGMA synchronous=NORMAL")  # labels can be made again: no fsync per transaction
    try:
        model = read_version(args.state / "models" / f"v{args.version}")
        left = store.relabel_left(args.version)
        log.info("relabel_started", events=left, priority=priority)
        t = time.monotonic()
        n = relabel(store, model, args.version, keep_going=lambda: not stopping and _alive(parent))
        seconds = time.monotonic() - t
        if stopping or not _alive(parent):
            log.info("relabel_stopped", events=n, seconds=round(seconds, 3))
            return 0
        pruned = store.prune_labels(args.version)
        log.info(
            "relabelled", events=n, seconds=round(seconds, 3), events_per_s=round(n / max(seconds, 1e-9)), pruned=pruned
        )
    finally:
        store.close()
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    raise SystemExit(main())
