"""The objective contract: a loss over a batch, with its own parameters if it needs any.

The objective contract: a loss over a batch for a stage, with its own parameters if it needs
any; ``StepOutput`` carries the loss and its logged parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional

import torch
from torch import nn

from vlm.config import StageConfig
from vlm.core.errors import ConfigError
from vlm.data.batch import Batch


@dataclass
class StepOutput:
    """The loss to optimise and named partial losses to log.

    ``tokens``: how many terms ``loss`` is the mean of (labelled tokens), or None for a loss that
    is not a per-token mean. When given, the trainer weights each micro-batch by it, so that a
    step's gradient is the mean over every token of every rank and micro-batch of the step, as
    one process over the same samples would compute it.
    """

    loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: Optional[torch.Tensor] = None


@dataclass
class ObjectiveContext:
    """What an objective is built for (``Objective.build``): the stage's model (train modes
    applied) and its tokenizer."""

    model: Any
    tokenizer: Any = None


class Objective(nn.Module):
    """A loss over a batch for a stage; may hold its own trainable parameters.

    ``needs_pixels``: the objective reads the batch's pixels (``batch.images``, ``image_kind``
    ``"pixels"``) itself, so a stage using it cannot train from the frozen-feature cache.
    """

    needs_pixels: ClassVar[bool] = False
    # with needs_pixels: the objective also takes AnyRes batches (each image several tiles)
    reads_tiles: ClassVar[bool] = False
    supports_packing: ClassVar[bool] = False
    # the objective reads preference pairs (vlm.data.pairs: PairDataset, PairCollator)
    reads_pairs: ClassVar[bool] = False
    # trains the connector's image-text heads (ITC / ITM), as BLIP-2 stage 1 does
    trains_matching: ClassVar[bool] = False
    # the component protocol (vlm.core.registry.Component): the objective's options
    # (stages.<name>.objective_options), or None when it takes none
    Options: ClassVar[Optional[type]] = None

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: ObjectiveContext) -> "Objective":
        """The objective for ``ctx.model`` (the constructor's ``(model, tokenizer)``)."""
        return cls(ctx.model, ctx.tokenizer)

    @classmethod
    def check(cls, stage: StageConfig, where: str) -> None:
        """The rules of stage ``where`` that belong to this objective: packing only where it
        ``supports_packing``, then :meth:`check_stage`. ConfigError naming the key."""
        if stage.packing and not cls.supports_packing:
            raise ConfigError(f"{where}.packing: objective '{stage.objective}' reads padded batches; "
                              "packing needs an objective that supports it (e.g. 'lm')")
        cls.check_stage(stage, where)

    @classmethod
    def check_stage(cls, stage: StageConfig, where: str) -> None:
        """Raise ConfigError when the stage's train modes make no sense for this objective."""

    @classmethod
    def frozen_parameters(cls, model) -> List[nn.Parameter]:
        """Parameters of ``model`` this objective never reads, frozen for its stage by
        ``vlm.training.stages.apply_stage`` (before it counts what trains): DDP would otherwise
        wait for their gradients, and weight decay would shrink them. The default: none."""
        return []

    def prepare_data(self, model, dataset, collate, batch_size: int, out_dir, is_main: bool) -> None:
        """Called once before training with the stage's starting ``model``, its ``dataset`` and
        ``collate`` (e.g. to precompute what the loss compares with); the default: nothing."""

    def forward(self, model, batch: Batch) -> StepOutput:
        """The loss of ``model`` on ``batch`` (and its logged parts)."""
        raise NotImplementedError
