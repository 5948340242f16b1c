"""Evaluation during training: a trainer callback that runs named evaluations every N steps.

A stage with ``eval_every: N`` and ``evals: [names]`` runs those entries of the run config's
``evals:`` on the in-training model after every N-th optimizer step and after the last one, each
capped to its ``max_samples_in_training`` samples when set. Scores are logged through
``ctx.log`` as a record ``{"stage", "step", "epoch", "eval/<name>/<metric>": value...}``: the
other callbacks' ``on_log`` see it, the metrics log writes it to the stage's ``metrics.jsonl`` (so
resume trims it like the loss records, and ``loss.png`` plots it in a second panel); the scores
go into the progress bar too (``ctx.progress``). ``keep_best: <name>/<metric>`` keeps the model of the best score so far
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

from vlm.training.callbacks import Callback, TrainingContext

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

    def on_train_start(self, ctx: TrainingContext, position):
        self.best = None
        if not self.keep_best:
            return
        best_file = ctx.out_dir / BEST_FILE
        if ctx.is_main:
            if position["step"] == 0:
                best_file.unlink(missing_ok=True)  # a fresh start: the old best is replaced at the first eval
            elif best_file.is_file():
                record = json.loads(best_file.read_text())
                # a best from past the resumed checkpoint belongs to a history that was trimmed
                if record.get("metric") == self.keep_best and record["step"] <= position["step"]:
                    self.best = float(record["value"])
        self.best = ctx.broadcast(self.best)  # every process, or the others would wait forever

    def on_step_end(self, ctx: TrainingContext, position):
        step = position["step"]
        if step % self.every == 0 or step == ctx.total_steps:
            self.evaluate(ctx, step)

    # --- work --------------------------------------------------------------------------------

    def evaluate(self, ctx: TrainingContext, step: int) -> Dict[str, float]:
        """Run the evaluations on every process's behalf and log them; returns the flat
        ``eval/...`` scores."""
        if step == self.last_step:
            return {}
        self.last_step = step
        scores: Optional[Dict[str, float]] = None
        if ctx.is_main:
            scores = self._run(ctx)
        scores = ctx.broadcast(scores)
        record = {"stage": ctx.stage_name, "step": step,
                  "epoch": round(step / ctx.steps_per_epoch, 4), **scores}
        ctx.log(record)  # the other callbacks see it; the metrics log writes it
        ctx.progress.update({k.split("/", 1)[1]: f"{v:.3g}" for k, v in scores.items()})
        logger.info("stage %s step %d: %s", ctx.stage_name, step,
                    ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if self.keep_best:
            self._keep_best(ctx, step, scores)
        return scores

    def _run(self, ctx: TrainingContext) -> Dict[str, float]:
        model = ctx.model()
        try:
            model.eval()
            scores = self.evaluate_model(model)
        finally:
            ctx.train_mode()  # back to the stage's train / eval modes
        return {eval_key(*key.split("/", 1)): float(value) for key, value in scores.items()}

    def _keep_best(self, ctx: TrainingContext, step: int, scores: Dict[str, float]) -> None:
        name, metric = self.keep_best.split("/", 1)
        key = eval_key(name, metric)
        if key not in scores:
            raise KeyError(f"stages.{ctx.stage_name}.keep_best: eval '{name}' reported no metric "
                           f"'{metric}'; it reported {sorted(k.split('/')[-1] for k in scores)}")
        value = scores[key]
        if self.best is not None and value <= self.best:
            return
        self.best = value
        ctx.save(ctx.out_dir / BEST_DIR)
        if ctx.is_main:
            (ctx.out_dir / BEST_FILE).write_text(json.dumps(
                {"metric": self.keep_best, "value": value, "step": step}))
