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
    image the LLM finds in one place, beside the spatial tokens); ``position_embedding``: a learned
    vector added to each visual token, so that a token says which cell it is. A ViT's features
    carry their position; a CNN's pooled cells do not, and the LLM's rotary positions only give
    the distance to the question, which changes with the question's length."""

    bias: bool = True
    pool: Optional[int] = None
    global_token: bool = False
    position_embedding: bool = False


class _TokenwiseProjector(Connector):
    """A per-token projection: K equals the number of patches, or ``pool**2`` when pooling."""

    Options = MLPOptions

    def __init__(self, llm_dim: int, pool: Optional[int], global_token: bool, position_embedding: bool,
                 num_patches: Optional[int]):
        super().__init__()
        self.pool = pool
        self.global_token = global_token
        self.register_parameter("position", None)
        if not position_embedding:
            return
        if num_patches is None:
            raise ValueError("connector position_embedding needs the encoder's number of patches")
        self.position = nn.Parameter(torch.empty(self.image_tokens(num_patches), llm_dim))
        nn.init.trunc_normal_(self.position, std=0.02)  # the scale of a transformers LLM's token embeddings

    def num_tokens(self, num_patches: int) -> int:
        return self.image_tokens(num_patches)

    def token_grid(self, num_patches: int) -> Optional[int]:
        """The side of the projected patch grid (after the ``global_token``); None for a patch
        count that is not a square (a CLS token kept)."""
        tokens = self.image_tokens(num_patches) - int(self.global_token)
        side = math.isqrt(tokens)
        return side if side * side == tokens else None

    def lead_tokens(self, num_patches: int) -> int:
        """The ``global_token``, when on."""
        return int(self.global_token)

    def image_tokens(self, num_patches: int) -> int:
        """How many tokens the projection of the image's features gives (``num_tokens`` less any
        token a subclass adds from elsewhere)."""
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
            self.image_tokens(features.shape[1])  # the connector's own error message
            features = pool_patch_grid(features, self.pool)
        if summary is not None:
            features = torch.cat([summary, features], dim=1)
        tokens = self.proj(features)
        if self.position is not None:
            if tokens.shape[1] != self.position.shape[0]:
                raise ValueError(f"connector position_embedding was built for {self.position.shape[0]} visual "
                                 f"tokens; these features give {tokens.shape[1]}")
            tokens = tokens + self.position.to(tokens.dtype)
        return tokens

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "_TokenwiseProjector":
        num_patches = getattr(ctx.vision, "num_patches", None)
        return cls(ctx.vision_dim, ctx.llm_dim, num_patches=num_patches, **options)


class LinearProjector(_TokenwiseProjector):
    """One linear layer, as LLaVA-1.0."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True, pool: Optional[int] = None,
                 global_token: bool = False, position_embedding: bool = False,
                 num_patches: Optional[int] = None):
        super().__init__(llm_dim, pool, global_token, position_embedding, num_patches)
        self.proj = nn.Linear(vision_dim, llm_dim, bias=bias)


class MLPProjector(_TokenwiseProjector):
    """Linear -> GELU -> Linear, as LLaVA-1.5 (and transformers' LlavaMultiModalProjector)."""

    def __init__(self, vision_dim: int, llm_dim: int, bias: bool = True, pool: Optional[int] = None,
                 global_token: bool = False, position_embedding: bool = False,
                 num_patches: Optional[int] = None):
        super().__init__(llm_dim, pool, global_token, position_embedding, num_patches)
        self.proj = nn.Sequential(
            nn.Linear(vision_dim, llm_dim, bias=bias), nn.GELU(), nn.Linear(llm_dim, llm_dim, bias=bias)
        )
