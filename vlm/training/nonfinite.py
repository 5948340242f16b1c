"""Non-finite losses, gradients and weights: stop or skip a step, and never save or load NaNs.

A diverging run (a learning rate far too high, an fp16 overflow...) produces a NaN or infinite
loss or gradient norm. :class:`NonFiniteGuard` decides, per optimizer step, what the stage does
(``stages.<name>.on_nonfinite``): ``stop`` raises a :class:`~vlm.core.errors.TrainingError` naming the
stage and the step before the optimizer touches the weights; ``skip`` drops the step's gradients
(no optimizer or scheduler step), logs and counts it, and stops once more than
``max_nonfinite_skips`` steps were skipped. :func:`vlm.modeling.weights.check_finite_weights` is
called before every save and after every load, so non-finite weights are never written and never used.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Optional

import torch

from vlm.config import NonFinitePolicy, OnNonFinite
from vlm.core.errors import TrainingError

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Per-step non-finite check of one stage (see the module docstring).

    Call :meth:`observe_loss` after each micro-batch (it returns whether the loss is finite, so
    the caller logs only finite losses) and :meth:`step_ok` once per optimizer step, before the
    optimizer steps: False means the step is skipped (the caller zeroes the gradients).
    """

    def __init__(self, policy: NonFinitePolicy, stage_name: str, accelerator=None):
        self.policy = policy.on_nonfinite
        self.max_skips = policy.max_nonfinite_skips
        self.stage_name = stage_name
        self.accelerator = accelerator
        self.skipped = 0
        self._bad_loss: Optional[float] = None

    def observe_loss(self, loss: torch.Tensor) -> bool:
        """Record one micro-batch's loss; False when it is NaN or infinite."""
        value = float(loss.detach())
        if math.isfinite(value):
            return True
        self._bad_loss = value
        return False

    def step_ok(self, grad_norm: Optional[float], parameters: Iterable[torch.nn.Parameter], step: int) -> bool:
        """True when optimizer step ``step`` may run; False when it is to be skipped; raises
        TrainingError when the stage must stop. ``grad_norm`` is the clipped norm (None: computed here)."""
        # fp16: the gradient scaler skips overflowing steps and lowers its scale by design
        scaled = getattr(self.accelerator, "scaler", None) is not None
        if grad_norm is None and not scaled:
            grads = [p.grad for p in parameters if p.grad is not None]
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        bad_loss, self._bad_loss = self._bad_loss, None
        bad = bad_loss is not None or (grad_norm is not None and not math.isfinite(grad_norm) and not scaled)
        if self.accelerator is not None and self.accelerator.num_processes > 1:  # every rank decides alike
            flag = torch.tensor([float(bad)], device=self.accelerator.device)
            bad = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            return True
        if bad_loss is not None:
            what = f"loss {bad_loss}"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            what = f"gradient norm {grad_norm}"
        else:
            what = "loss or gradient norm on another process"
        where = f"stage '{self.stage_name}' step {step}"
        if self.policy is OnNonFinite.stop:
            raise TrainingError(f"{where}: non-finite {what}; stopped before updating the weights (the last "
                                "checkpoint is kept). Lower the learning rate, use bf16 instead of fp16, or set "
                                f"stages.{self.stage_name}.on_nonfinite: skip")
        self.skipped += 1
        logger.warning("%s: non-finite %s; step skipped (%d of at most %d)", where, what, self.skipped,
                       self.max_skips)
        if self.skipped > self.max_skips:
            raise TrainingError(f"{where}: {self.skipped} steps skipped for non-finite losses or gradients, "
                                f"more than stages.{self.stage_name}.max_nonfinite_skips = {self.max_skips}; "
                                "the run is diverging: lower the learning rate")
        return False
