"""Trainer callbacks: the seam through which logging, evaluation, checkpoint policies and
benchmarks plug into the training loop without editing it.

Every hook receives the :class:`~vlm.training.trainer.Trainer` (its ``stage``, ``stage_name``,
``out_dir``, ``accelerator``, ``total_steps``, ``history``...) and does nothing by default, so a
callback overrides only what it needs. Hooks run on every process; a callback that writes files
checks ``trainer.is_main``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List


class Callback:
    """Hooks the trainer calls at fixed points of a stage; override the ones you need."""

    def on_train_start(self, trainer, position: dict) -> None:
        """Before the first step (``position`` is the data position, restored on resume)."""

    def on_step_end(self, trainer, position: dict) -> None:
        """After every optimizer step (``position["step"]`` is the step just taken)."""

    def on_log(self, trainer, record: dict) -> None:
        """A metrics record, about to be appended to ``metrics.jsonl``; may add keys to it."""

    def on_checkpoint(self, trainer, folder: Path) -> None:
        """After a periodic checkpoint was written to ``folder``."""

    def on_train_end(self, trainer, final: Path) -> None:
        """After the stage's ``final`` output was written."""


class CallbackList(Callback):
    """Calls each of several callbacks in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def on_train_start(self, trainer, position):
        for cb in self.callbacks:
            cb.on_train_start(trainer, position)

    def on_step_end(self, trainer, position):
        for cb in self.callbacks:
            cb.on_step_end(trainer, position)

    def on_log(self, trainer, record):
        for cb in self.callbacks:
            cb.on_log(trainer, record)

    def on_checkpoint(self, trainer, folder):
        for cb in self.callbacks:
            cb.on_checkpoint(trainer, folder)

    def on_train_end(self, trainer, final):
        for cb in self.callbacks:
            cb.on_train_end(trainer, final)
