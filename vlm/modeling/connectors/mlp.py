"""LLaVA's projectors: ``linear`` and ``mlp2x_gelu`` (Linear, GELU, Linear)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from vlm.modeling.connectors.base import BuildContext, Connector
from vlm.modeling.vision.base import pool_patch_grid


@dataclass
class MLPOptions:
    """``bias`` on the projection layers; ``pool``: average the square patch grid down to a
    ``pool x pool`` grid before projecting (fewer visual tokens; None keeps every patch);
    ``global_token``: one more token in front, the mean of every patch (a summary of the whole
    image the LLM finds in one place, beside the spatial tokens)."""

    bias: bool = True
    pool: Optional[int] = None
    global_token: bool = False


class _TokenwiseProjector(Connector):
    """A per-token projection: K equals the number of patches, or ``pool**2`` when pooling."""

    Options = MLPOptions
    pool: Optional[int] = None
    global_token: bool = False

    def num_tokens(self, num_patches: int) -> int:
        extra = int(self.global_token)
        if self.pool is None:
            return num_patches + extra
        grid = math.isqrt(num_patches)
        if grid * grid != num_patches or self.pool > grid:
            raise ValueError(f"connector pool={self.pool} needs a square patch grid of at least "
                             f"{self.pool}x{self.pool} without CLS; got {num_patches} features")
        return self.pool * self.pool + extra

    def forward(self, features: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        summary = features.mean(dim=1, keepdim=True) if self.global_token else None
        if self.pool is not None:
            self.num_tokens(features.shape[1])  # the connector's own error message
            features = pool_patch_grid(features, self.pool)
        if summary is not None:
            features = torch.cat([summary, features], dim=1)
        return self.proj(features)


class LinearProjector(_TokenwiseProjector):
    """One linear layer, as LLaVA-1.0."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True, pool: Optional[int] = None,
                 global_token: bool = False):
        super().__init__()
        self.pool = pool
        self.global_token = global_token
        self.proj = nn.Linear(vision_dim, llm_dim, bias=bias)

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "LinearProjector":
        return cls(ctx.vision_dim, ctx.llm_dim, **options)


class MLPProjector(_TokenwiseProjector):
    """Linear -> GELU -> Linear, as LLaVA-1.5 (and transformers' LlavaMultiModalProjector)."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True, pool: Optional[int] = None,
                 global_token: bool = False):
        super().__init__()
        self.pool = pool
        self.global_token = global_token
        self.proj = nn.Sequential(
            nn.Linear(vision_dim, llm_dim, bias=bias), nn.GELU(), nn.Linear(llm_dim, llm_dim, bias=bias)
        )

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "MLPProjector":
        return cls(ctx.vision_dim, ctx.llm_dim, **options)
