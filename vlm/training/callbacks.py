"""Trainer callbacks and the narrow context they see: the seam into the training loop.

Every hook receives a :class:`TrainingContext`, the narrow view of the running stage that the
trainer builds once (its name, the current step, ``out_dir``, the unwrapped model, ``log`` /
``save`` / ``broadcast``...), never the trainer itself, and does nothing by default, so a callback
overrides only what it needs. Hooks run on every process; a callback that writes files checks
``ctx.is_main``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List


class TrainingContext:
    """What a callback sees of a training stage, built once by the trainer.

    Attributes: ``stage_name``; ``step`` (the current optimizer step, kept up to date by the
    trainer); ``total_steps``; ``steps_per_epoch``; ``out_dir`` (the stage's output folder);
    ``is_main`` (rank 0); ``num_processes``; ``progress`` (extra progress-bar fields, ``name ->
    text``, shown from the next log step on).
    """

    def __init__(self, *, stage_name: str, total_steps: int, steps_per_epoch: int, out_dir: Path,
                 is_main: bool, num_processes: int, model: Callable[[], Any], log: Callable[[dict], None],
                 save: Callable[[Path], None], broadcast: Callable[[Any], Any], train_mode: Callable[[], None]):
        self.stage_name = stage_name
        self.step = 0
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self.num_processes = num_processes
        self.progress: Dict[str, str] = {}
        self._model, self._log, self._save = model, log, save
        self._broadcast, self._train_mode = broadcast, train_mode

    def model(self):
        """The model being trained (the ``VisionLanguageModel``, unwrapped from DDP / FSDP)."""
        return self._model()

    def log(self, record: dict) -> None:
        """Log a metrics record: every callback's ``on_log`` sees it (and may add keys to it), the
        ``MetricsLog`` callback, the one writer of ``metrics.jsonl``, appends it there, and the
        trainer keeps it in its history. Every process calls it."""
        self._log(record)

    def save(self, folder: Path) -> None:
        """Atomically write a model-only checkpoint to ``folder``. Every process must call it (a
        sharding strategy gathers the state first)."""
        self._save(Path(folder))

    def broadcast(self, value):
        """Rank 0's ``value``, on every process (every process must call it)."""
        return self._broadcast(value)

    def train_mode(self) -> None:
        """Put the model back into the stage's train / eval modes (after evaluating it)."""
        self._train_mode()


class Callback:
    """Hooks the trainer calls at fixed points of a stage; override the ones you need."""

    def on_train_start(self, ctx: TrainingContext, position: dict) -> None:
        """Before the first step (``position`` is the data position, restored on resume)."""

    def on_step_end(self, ctx: TrainingContext, position: dict) -> None:
        """After every optimizer step (``position["step"]`` is the step just taken)."""

    def on_log(self, ctx: TrainingContext, record: dict) -> None:
        """A metrics record, about to be appended to ``metrics.jsonl``; may add keys to it."""

    def on_checkpoint(self, ctx: TrainingContext, folder: Path) -> None:
        """After a periodic checkpoint was written to ``folder``."""

    def on_train_end(self, ctx: TrainingContext, final: Path) -> None:
        """After the stage's ``final`` output was written."""

    def on_train_abort(self, ctx: TrainingContext, error: BaseException) -> None:
        """The stage stops with ``error`` (a failure, or TrainingPreempted after its checkpoint);
        only this process's own resources may be released here (no collective)."""


class CallbackList(Callback):
    """Calls each of several callbacks in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def on_train_start(self, ctx, position):
        for cb in self.callbacks:
            cb.on_train_start(ctx, position)

    def on_step_end(self, ctx, position):
        for cb in self.callbacks:
            cb.on_step_end(ctx, position)

    def on_log(self, ctx, record):
        for cb in self.callbacks:
            cb.on_log(ctx, record)

    def on_checkpoint(self, ctx, folder):
        for cb in self.callbacks:
            cb.on_checkpoint(ctx, folder)

    def on_train_end(self, ctx, final):
        for cb in self.callbacks:
            cb.on_train_end(ctx, final)

    def on_train_abort(self, ctx, error):
        for cb in self.callbacks:
            cb.on_train_abort(ctx, error)
