"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu`` (Linear, GELU, Linear)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlm.modeling.connectors.base import Connector
from vlm.modeling.connectors.registry import CONNECTORS


@dataclass
class MLPOptions:
    """``bias`` on the projection layers."""

    bias: bool = True


class _TokenwiseProjector(Connector):
    """A per-token projection: K equals the number of patches."""

    Options = MLPOptions

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


@CONNECTORS.register("linear")
class LinearProjector(_TokenwiseProjector):
    """One linear layer, as LLaVA-1.0."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(vision_dim, llm_dim, bias=bias)

    @classmethod
    def from_config(cls, options: dict, vision_dim: int, llm_dim: int) -> "LinearProjector":
        return cls(vision_dim, llm_dim, **options)


@CONNECTORS.register("mlp2x_gelu")
class MLPProjector(_TokenwiseProjector):
    """Linear -> GELU -> Linear, as LLaVA-1.5 (and transformers' LlavaMultiModalProjector)."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(vision_dim, llm_dim, bias=bias), nn.GELU(), nn.Linear(llm_dim, llm_dim, bias=bias)
        )

    @classmethod
    def from_config(cls, options: dict, vision_dim: int, llm_dim: int) -> "MLPProjector":
        return cls(vision_dim, llm_dim, **options)
