"""A connector defined outside the vlm package, registered on import (the plugin route).

A run config lists this module under ``plugins:``; importing it registers ``gated_linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from vlm.modeling.connectors import CONNECTORS, BuildContext, Connector


@dataclass
class GatedLinearOptions:
    """``gate_init``: the starting value of the learned scalar gate."""

    gate_init: float = 1.0


@CONNECTORS.register("gated_linear")
class GatedLinearConnector(Connector):
    """One linear projection per patch, scaled by a learned gate."""

    Options = GatedLinearOptions

    def __init__(self, vision_dim: int, llm_dim: int, gate_init: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "GatedLinearConnector":
        return cls(ctx.vision_dim, ctx.llm_dim, **options)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, features: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        return self.gate * self.proj(features)
