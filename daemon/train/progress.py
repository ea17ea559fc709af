"""A training progress bar on a terminal (rich); silent otherwise."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from model.train import EpochStats


class EpochProgress:
    def __init__(self, epochs: int, enabled: bool) -> None:
        self.epochs, self.enabled = epochs, enabled
        self._progress: Any = None
        self._task: Any = None
        self._done = 0

    def __enter__(self) -> EpochProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("epoch {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.epochs, info="")
        return self

    def update(self, s: EpochStats) -> None:
        if self._progress is not None and self._task is not None:
            info = f"β {s.beta:.3g} γ {s.gamma:.3g} rec {s.rec:.3f} KL {s.kl:.3f} val {s.val_rec:.3f}"
            self._done += 1  # epochs of every restart, one after the other
            self._progress.update(self._task, completed=self._done, info=info)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.__exit__(et, e, tb)
