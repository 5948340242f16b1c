"""The objective contract: a loss over a batch for a stage, with its own parameters if it needs
any; ``StepOutput`` carries the loss and its logged parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List

import torch
from torch import nn

from vlm.config import StageConfig


@dataclass
class StepOutput:
    """The loss to optimise and named partial losses to log."""

    loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """A loss over a batch for a stage; may hold its own trainable parameters.

    ``needs_pixels``: the objective reads ``batch["pixel_values"]`` itself, so a stage using it
    cannot train from the frozen-feature cache.
    """

    needs_pixels: ClassVar[bool] = False
    supports_packing: ClassVar[bool] = False

    @classmethod
    def check_stage(cls, stage: StageConfig, where: str) -> None:
        """Raise ConfigError when the stage's train modes make no sense for this objective."""

    @classmethod
    def frozen_parameters(cls, model) -> List[nn.Parameter]:
        """Parameters of ``model`` this objective never reads, frozen for its stage by
        ``vlm.training.stages.apply_stage`` (before it counts what trains): DDP would otherwise
        wait for their gradients, and weight decay would shrink them. The default: none."""
        return []

    def forward(self, model, batch: Dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError
