"""``question_aware_mlp``: ``mlp2x_gelu``'s visual tokens plus one token that reads the question.

``question_aware_mlp``: ``mlp2x_gelu``'s visual tokens plus one token that depends on the
question (InstructBLIP's instruction-aware visual tokens, with the "bag of words + CNN features"
VQA baseline in place of a Q-Former).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from vlm.modeling.connectors.base import BuildContext
from vlm.modeling.connectors.mlp import MLPOptions, MLPProjector
from vlm.modeling.vision.base import pool_patch_grid


@dataclass
class QuestionAwareMLPOptions(MLPOptions):
    """``MLPOptions`` plus, for the question token: ``question_grid``, the patch grid is averaged
    to ``question_grid x question_grid`` cells read side by side (so the token knows where things
    are; 0 or a non-square grid: the mean of every patch); ``question_hidden``, its MLP's width."""

    question_grid: int = 4
    question_hidden: int = 256


class QuestionAwareMLPProjector(MLPProjector):
    """``mlp2x_gelu`` (with its ``pool``, ``global_token`` and ``position_embedding``) and, in
    front, a token computed from the image's pooled cells and the bag of the question's words by a
    small MLP. A tiny LLM trained from scratch learns questions that compare a word of the question
    with the image ("is the shape red?", "where is the red shape?") only after a long and
    unpredictable flat stretch; this token lets the connector do that comparison, and the LLM read
    it like any other visual token. The question is each image's instruction (the user turn's
    text), so every image of a batch needs one."""

    Options = QuestionAwareMLPOptions
    instruction_aware = True

    def __init__(self, vision_dim: int, llm_dim: int, tokenizer, num_patches: int, question_grid: int = 4,
                 question_hidden: int = 256, **mlp_options):
        super().__init__(vision_dim, llm_dim, num_patches=num_patches, **mlp_options)
        if tokenizer is None:
            raise ValueError("connector question_aware_mlp needs the LLM's tokenizer to read the questions")
        self.tokenizer = tokenizer
        self.llm_dim = llm_dim
        grid = math.isqrt(num_patches)
        self.question_grid = min(question_grid, grid) if question_grid > 0 and grid * grid == num_patches else 0
        width = vision_dim * max(self.question_grid, 1) ** 2
        self.question_image = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, question_hidden))
        self.question_words = nn.EmbeddingBag(len(tokenizer), question_hidden, mode="sum")
        self.question_mlp = nn.Sequential(nn.GELU(), nn.Linear(2 * question_hidden, question_hidden), nn.GELU(),
                                          nn.Linear(question_hidden, llm_dim))

    @classmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "QuestionAwareMLPProjector":
        return cls(ctx.vision_dim, ctx.llm_dim, ctx.tokenizer, getattr(ctx.vision, "num_patches", None), **options)

    def num_tokens(self, num_patches: int) -> int:
        return super().num_tokens(num_patches) + 1

    def lead_tokens(self, num_patches: int) -> int:
        """The question token, then ``mlp2x_gelu``'s (its ``global_token``)."""
        return 1 + super().lead_tokens(num_patches)

    def question_parameters(self):
        """The question token's own parameters (what ``answer_words`` trains in a vision warm-up)."""
        return [p for m in (self.question_image, self.question_words, self.question_mlp) for p in m.parameters()]

    def _bags(self, questions: Sequence[str], device: torch.device):
        """(flat unique token ids, offsets) of each question, for the EmbeddingBag."""
        ids, offsets = [], []
        for tokens in self.tokenizer(list(questions), add_special_tokens=False)["input_ids"]:
            offsets.append(len(ids))
            ids.extend(sorted(set(tokens)))
        return (torch.tensor(ids, dtype=torch.long, device=device),
                torch.tensor(offsets, dtype=torch.long, device=device))

    def question_token(self, features: torch.Tensor, questions: Sequence[str]) -> torch.Tensor:
        """``(B, 1, llm_dim)``: the token computed from the image's cells and each question."""
        if self.question_grid:
            cells = pool_patch_grid(features, self.question_grid).flatten(1)
        else:
            cells = features.mean(dim=1)
        asked = self.question_words(*self._bags(questions, features.device))
        image = self.question_image(cells)
        return self.question_mlp(torch.cat([image, asked.to(image.dtype)], dim=-1)).unsqueeze(1)

    def forward(self, features: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        if instructions is None or len(instructions) != features.shape[0]:
            got = "none" if instructions is None else len(instructions)
            raise ValueError(f"connector question_aware_mlp needs one question per image: {features.shape[0]} "
                             f"image(s), {got} question(s)")
        tokens = super().forward(features)
        return torch.cat([self.question_token(features, instructions).to(tokens.dtype), tokens], dim=1)
