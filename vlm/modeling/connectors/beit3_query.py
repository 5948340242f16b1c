"""``beit3_query``: learnable queries read the image inside BEiT3 (the Muffin / VisCPM bridge).

The queries are appended after BEiT3's image tokens; image tokens go through the vision expert,
queries through the language expert, with full attention between them. The query outputs are
projected to the LLM's width, so an image becomes ``num_queries`` visual tokens whatever its
patch count.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from vlm.modeling.connectors.base import BuildContext, Connector
from vlm.modeling.vision.beit3 import BEiT3VisionEncoder


class QueryProjection(str, enum.Enum):
    """How query outputs are mapped to the LLM width."""

    linear = "linear"
    mlp2x_gelu = "mlp2x_gelu"


@dataclass
class BEiT3QueryOptions:
    """``num_queries`` (K); ``projection``: ``linear`` or ``mlp2x_gelu``; ``init_from_text``:
    start the first and last queries from BEiT3's text embeddings of ``bos_token_id`` and
    ``eos_token_id`` (0 and 2 in BEiT3's XLM-R sentencepiece vocabulary, as Muffin does)."""

    num_queries: int = 64
    projection: QueryProjection = QueryProjection.linear
    init_from_text: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 2


def _require_beit3(vision: nn.Module) -> BEiT3VisionEncoder:
    if not isinstance(vision, BEiT3VisionEncoder):
        raise TypeError(f"connector 'beit3_query' runs inside the 'beit3' vision encoder; "
                        f"got {type(vision).__name__}")
    return vision


class BEiT3QueryConnector(Connector):
    """Learnable queries through BEiT3's language expert, then a projection to the LLM."""

    Options = BEiT3QueryOptions
    requires_vision = BEiT3VisionEncoder

    def __init__(self, vision_dim: int, llm_dim: int, num_queries: int = 64,
                 projection: str = "linear", init_from_text: bool = True, bos_token_id: int = 0,
                 eos_token_id: int = 2):
        super().__init__()
        if num_queries < (2 if init_from_text else 1):
            raise ValueError(f"connector 'beit3_query': num_queries={num_queries} is too small"
                             f"{' for BOS/EOS initialisation (needs >= 2)' if init_from_text else ''}")
        self.num_queries = num_queries
        self.init_from_text = init_from_text
        self.text_ids = (bos_token_id, eos_token_id)
        self.queries = nn.Parameter(torch.empty(num_queries, vision_dim))
        nn.init.trunc_normal_(self.queries, std=0.02, a=-0.02, b=0.02)
        projection = QueryProjection(projection)
        if projection is QueryProjection.linear:
            self.proj = nn.Linear(vision_dim, llm_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "BEiT3QueryConnector":
        """Build for ``ctx``; with a BEiT3 encoder in ``ctx.vision`` (required to run), it is
        checked and, with ``init_from_text``, its BOS / EOS text embeddings start the first /
        last query."""
        connector = cls(ctx.vision_dim, ctx.llm_dim, **options)
        if ctx.vision is not None:
            connector.init_from_encoder(ctx.vision)
        return connector

    @classmethod
    def feature_cache_conflict(cls):
        return "runs the vision encoder itself and cannot read cached features"

    def num_tokens(self, num_patches: int) -> int:
        return self.num_queries

    def init_from_encoder(self, vision: nn.Module) -> None:
        """Check the encoder is BEiT3; with ``init_from_text``, copy its BOS / EOS text
        embeddings into the first / last query."""
        vision = _require_beit3(vision)
        if self.init_from_text:
            with torch.no_grad():
                bos, eos = vision.text_embeddings(list(self.text_ids))
                self.queries[0] = bos
                self.queries[-1] = eos

    def encode_images(self, vision: nn.Module, pixel_values: torch.Tensor,
                      instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        return self(_require_beit3(vision).forward_with_queries(pixel_values, self.queries))

    def forward(self, query_states: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Project BEiT3's query outputs ``(B, K, vision_dim)`` to ``(B, K, llm_dim)``."""
        return self.proj(query_states.to(self.proj_dtype))

    @property
    def proj_dtype(self) -> torch.dtype:
        return self.queries.dtype
