"""Evaluation during training: a trainer callback that runs named evaluations every N steps.

A stage with ``eval_every: N`` and ``evals: [names]`` runs those entries of the run config's
``evals:`` on the in-training model after every N-th optimizer step and after the last one, each
capped to its ``max_samples_in_training`` samples when set. Scores go into the stage's
``metrics.jsonl`` as a record ``{"stage", "step", "epoch", "eval/<name>/<metric>": value...}``
(so resume trims them like the loss records, and ``loss.png`` plots them in a second panel), and
into the progress bar. ``keep_best: <name>/<metric>`` keeps the model of the best score so far
(higher is better) in ``<stage>/best/`` (written atomically, with ``best.json`` saying the step
and score).

The evaluations themselves are injected (an :data:`Evaluator`, built by the application from the
run config's ``evals:``), so ``vlm.training`` never imports ``vlm.evaluation``.

Several processes: the main process evaluates (generation runs on the unwrapped model, which
needs no collective), the others wait at a barrier and receive the scores by broadcast, so every
process takes the same ``keep_best`` decision. Sharded models (FSDP / ZeRO-3) are not supported
here: the main process alone cannot run a sharded model.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Dict, Optional

from torch import nn

from vlm.training.callbacks import Callback
from vlm.training.stages import set_train_modes

logger = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "best.json"


def eval_key(name: str, metric: str) -> str:
    """The metrics-record key of one evaluation's metric."""
    return f"eval/{name}/{metric}"


# the in-training model (in eval mode) -> ``{"<eval>/<metric>": score}``
Evaluator = Callable[[nn.Module], Dict[str, float]]


class EvalDuringTraining(Callback):
    """Calls ``evaluate`` on the in-training model every ``every`` steps and after the last;
    ``keep_best`` (``<eval>/<metric>``) keeps the best model so far."""

    def __init__(self, evaluate: Evaluator, every: int, keep_best: Optional[str] = None):
        self.evaluate_model = evaluate
        self.every = int(every)
        self.keep_best: Optional[str] = keep_best
        self.best: Optional[float] = None
        self.last_step = -1

    # --- hooks -------------------------------------------------------------------------------

    def on_train_start(self, trainer, position):
        self.best = None
        if not self.keep_best:
            return
        best_file = trainer.out_dir / BEST_FILE
        if trainer.is_main:
            if position["step"] == 0:
                best_file.unlink(missing_ok=True)  # a fresh start: the old best is replaced at the first eval
            elif best_file.is_file():
                record = json.loads(best_file.read_text())
                # a best from past the resumed checkpoint belongs to a history that was trimmed
                if record.get("metric") == self.keep_best and record["step"] <= position["step"]:
                    self.best = float(record["value"])
        self.best = self._broadcast(trainer, self.best)  # every process, or the others would wait forever

    def on_step_end(self, trainer, position):
        step = position["step"]
        if step % self.every == 0 or step == trainer.total_steps:
            self.evaluate(trainer, step)

    # --- work --------------------------------------------------------------------------------

    def evaluate(self, trainer, step: int) -> Dict[str, float]:
        """Run the evaluations on every process's behalf; returns the flat ``eval/...`` scores."""
        if step == self.last_step:
            return {}
        self.last_step = step
        scores: Optional[Dict[str, float]] = None
        if trainer.is_main:
            scores = self._run(trainer, step)
        scores = self._broadcast(trainer, scores)
        record = {"stage": trainer.stage_name, "step": step,
                  "epoch": round(step / trainer.steps_per_epoch, 4), **scores}
        trainer.history.append(record)
        if trainer.is_main:
            with (trainer.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
        extras = getattr(trainer, "progress_extras", None)
        if extras is not None:
            extras.update({k.split("/", 1)[1]: f"{v:.3g}" for k, v in scores.items()})
        logger.info("stage %s step %d: %s", trainer.stage_name, step,
                    ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if self.keep_best:
            self._keep_best(trainer, step, scores)
        return scores

    def _run(self, trainer, step: int) -> Dict[str, float]:
        model = trainer._unwrapped()
        try:
            model.eval()
            scores = self.evaluate_model(model)
        finally:
            set_train_modes(model, trainer.stage)  # back to the stage's train / eval modes
        return {eval_key(*key.split("/", 1)): float(value) for key, value in scores.items()}

    def _keep_best(self, trainer, step: int, scores: Dict[str, float]) -> None:
        name, metric = self.keep_best.split("/", 1)
        key = eval_key(name, metric)
        if key not in scores:
            raise KeyError(f"stages.{trainer.stage_name}.keep_best: eval '{name}' reported no metric "
                           f"'{metric}'; it reported {sorted(k.split('/')[-1] for k in scores)}")
        value = scores[key]
        if self.best is not None and value <= self.best:
            return
        self.best = value
        trainer.save_checkpoint(trainer.out_dir / BEST_DIR, None)
        if trainer.is_main:
            (trainer.out_dir / BEST_FILE).write_text(json.dumps(
                {"metric": self.keep_best, "value": value, "step": step}))

    @staticmethod
    def _broadcast(trainer, value):
        """``value`` of the main process, on every process."""
        acc = trainer.accelerator
        if acc.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]
