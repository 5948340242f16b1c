"""Vision-encoder warm-ups that need no language model.

- ``caption_bow``: a vision-encoder warm-up that needs no language model: from the patch
  features averaged over a 2x2 grid (four cells, concatenated, so where things are survives;
  a plain mean when the features are not a square grid), a linear head predicts which tokens
  occur in the sample's trained text (multi-label, binary cross-entropy). A from-scratch encoder learns to see colours, shapes
  and positions from captions in a few hundred steps this way, far faster than through a frozen
  LLM's attention. The head is discarded after the stage; only the encoder's weights are kept.
  An AnyRes-tiled image (``model.vision.tiling``) is its overview and tiles: the head reads the
  element-wise max over them of each one's pooled features, so a shape seen in one tile counts.
- ``answer_words``: from pooled features and the question's words, predict the answer's words
  (and train a question-aware connector's question token to hold them); tiles as above.

An objective owns any extra parameters it needs (``parameters()``), and its ``loss`` returns a
``StepOutput`` whose ``losses`` are logged separately beside ``loss``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm.config import ConfigError, Train
from vlm.core.errors import DataFormatError
from vlm.data.anyres import TileLayout
from vlm.data.batch import Batch
from vlm.data.processor import IGNORE_INDEX
from vlm.modeling.tiling import per_tile
from vlm.modeling.vision.base import pool_patch_grid
from vlm.training.objectives.base import Objective, StepOutput


def _one_image_per_sample(model, batch: Batch, objective: str) -> torch.Tensor:
    """The batch's pixels; DataFormatError unless every sample shows exactly one image."""
    if batch.images is None or batch.image_kind != "pixels":
        raise DataFormatError(f"objective '{objective}' needs samples with images")
    images_per_row = (batch.input_ids == model.image_token_id).sum(1) // model.num_image_tokens
    if not bool((images_per_row == 1).all()):
        raise DataFormatError(f"objective '{objective}' needs exactly one image per sample")
    return batch.images


def _tiles_per_image(model, batch: Batch, objective: str) -> List[int]:
    """How many encoder inputs (overview and tiles) each sample's one AnyRes-tiled image has;
    DataFormatError unless every sample shows exactly one image."""
    layouts = [TileLayout.from_row(row) for row in batch.image_layouts.tolist()]
    tokens_per_row = (batch.input_ids == model.image_token_id).sum(1).tolist()
    if len(layouts) != len(tokens_per_row) or any(n != layout.num_tokens() for n, layout in zip(tokens_per_row, layouts)):
        raise DataFormatError(f"objective '{objective}' needs exactly one image per sample")
    return [layout.num_tiles for layout in layouts]


def _encode(model, batch: Batch, objective: str) -> Tuple[torch.Tensor, Optional[List[int]]]:
    """The encoder's features of the batch's one image per sample, and (AnyRes) how many of
    their rows each image's overview and tiles are; None untiled."""
    if batch.image_layouts is None:
        return model.vision(_one_image_per_sample(model, batch, objective)), None
    return model.vision(batch.images), _tiles_per_image(model, batch, objective)


def _max_over_tiles(rows: torch.Tensor, tiles: List[int]) -> torch.Tensor:
    """``(sum(tiles), D)`` rows of every image's overview and tiles -> ``(len(tiles), D)``, each
    image's element-wise max."""
    return torch.stack([image.amax(dim=0) for image in rows.split(tiles)])


class CaptionBagOfWords(Objective):
    """Vision warm-up: predict the set of trained tokens from mean-pooled patch features."""

    needs_pixels = True
    reads_tiles = True

    def __init__(self, model, tokenizer):
        super().__init__()
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.grid = math.isqrt(model.vision.num_patches)
        self.cells = 4 if self.grid * self.grid == model.vision.num_patches and self.grid >= 2 else 1
        width = model.vision.embed_dim * self.cells
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, self.vocab_size))

    @classmethod
    def check_stage(cls, stage, where):
        modes = {c: Train(getattr(stage.train, c)) for c in ("vision", "connector", "llm")}
        if modes["vision"] is not Train.full or modes["connector"] is not Train.frozen or modes["llm"] is not Train.frozen:
            raise ConfigError(f"{where}.train: objective 'caption_bow' trains the vision encoder only "
                              "(vision: full, connector: frozen, llm: frozen)")

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Multi-hot ``(B, vocab)`` of the trained tokens of each row, special tokens excluded."""
        hot = torch.zeros(labels.shape[0], self.vocab_size, device=labels.device)
        valid = labels != IGNORE_INDEX
        rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
        hot[rows[valid], labels[valid]] = 1.0
        hot[:, self.special.to(labels.device)] = 0.0
        return hot

    def forward(self, model, batch: Batch):
        features, tiles = _encode(model, batch, "caption_bow")
        if self.cells == 4:
            # channel-major (D x 4 cells), the head's input layout
            pooled = rearrange(pool_patch_grid(features, 2), "b cells d -> b (d cells)")
        else:
            pooled = features.mean(dim=1)
        if tiles is not None:
            pooled = _max_over_tiles(pooled, tiles)
        loss = F.binary_cross_entropy_with_logits(self.head(pooled), self.targets(batch.labels))
        return StepOutput(loss, {"loss_bow": loss.detach()})


class AnswerWords(Objective):
    """Vision warm-up that learns what the questions ask about: from the patch features pooled to
    at most 4x4 cells and the bag of the question's words, a small MLP predicts the words of the trained
    answer (soft-target softmax cross-entropy over the vocabulary; special and whitespace-only
    tokens left out). Unlike ``caption_bow``'s binary cross-entropy averaged over the whole
    vocabulary, a wrong answer costs ~log(#choices) on every question of its kind, so an encoder
    blind to one attribute (shape, say) cannot hide. On captions (a constant question) it is a
    softmax bag-of-words caption prediction. The head is discarded after the stage.

    With a question-aware connector (``question_aware_mlp``) and ``train.connector: full``, the
    connector's question token takes the place of the head's image-question interaction: it is
    trained here to hold the answer (its words read off it by a linear layer), so the LLM stages
    start from a token that already answers the comparisons. The connector's other weights stay
    frozen.

    An AnyRes-tiled image is read as ``caption_bow`` reads it: the element-wise max over its
    overview and tiles of each one's pooled features, and of each one's question token (each
    tile's token asks the image's question), so a shape seen in one tile answers."""

    needs_pixels = True
    reads_tiles = True
    hidden = 256

    def __init__(self, model, tokenizer):
        super().__init__()
        self.vocab_size = len(tokenizer)
        special = set(tokenizer.all_special_ids)
        blank = [i for i in range(self.vocab_size)
                 if i in special or not tokenizer.decode([i]).strip()]
        self.register_buffer("ignored", torch.tensor(sorted(set(blank)), dtype=torch.long), persistent=False)
        grid = math.isqrt(model.vision.num_patches)
        # keep where things are: pool the patch grid to at most 4x4 cells (mean if not a square)
        self.pool = min(grid, 4) if grid * grid == model.vision.num_patches else 0
        width = model.vision.embed_dim * max(self.pool, 1) ** 2
        self.image_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, self.hidden))
        self.question_proj = nn.Linear(self.vocab_size, self.hidden)
        # logits = what the image shows + what the question asks for + their interaction: the
        # direct image -> word path gives the encoder a strong gradient from the first step (as
        # caption_bow's), the question path the answer prior, the MLP questions like "is it red?"
        self.image_words = nn.Sequential(nn.GELU(), nn.Linear(self.hidden, self.vocab_size))
        self.question_words = nn.Sequential(nn.GELU(), nn.Linear(self.hidden, self.vocab_size))
        # built after the stage's train modes are applied: the question token is used when it trains
        self.asks_connector = hasattr(model.connector, "question_token") and any(
            p.requires_grad for p in model.connector.question_parameters())
        if self.asks_connector:
            self.answer_from_token = nn.Linear(model.connector.llm_dim, self.vocab_size)
        else:
            self.head = nn.Sequential(nn.GELU(), nn.Linear(2 * self.hidden, self.hidden), nn.GELU(),
                                      nn.Linear(self.hidden, self.vocab_size))

    @classmethod
    def check_stage(cls, stage, where):
        modes = {c: Train(getattr(stage.train, c)) for c in ("vision", "connector", "llm")}
        if modes["vision"] is not Train.full or modes["llm"] is not Train.frozen \
                or modes["connector"] not in (Train.frozen, Train.full):
            raise ConfigError(f"{where}.train: objective 'answer_words' trains the vision encoder (vision: full, "
                              "llm: frozen), and a question-aware connector's question token with "
                              "connector: full (else connector: frozen)")

    @classmethod
    def frozen_parameters(cls, model):
        connector = model.connector
        question = set(map(id, connector.question_parameters())) if hasattr(connector, "question_token") else set()
        return [p for p in connector.parameters() if id(p) not in question]

    def _bag(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Multi-hot ``(B, vocab)`` of the ``ids`` where ``keep``, ignored tokens cleared."""
        hot = torch.zeros(ids.shape[0], self.vocab_size, device=ids.device)
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        hot[rows[keep], ids[keep]] = 1.0
        hot[:, self.ignored] = 0.0
        return hot

    def logits(self, pooled: torch.Tensor, question: torch.Tensor,
               question_token: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, vocab)`` answer-word logits from pooled image features and question bags (and,
        with a question-aware connector, its question tokens ``(B, llm_dim)``)."""
        image, asked = self.image_proj(pooled), self.question_proj(question)
        prior = self.image_words(image) + self.question_words(asked)
        if question_token is not None:
            return prior + self.answer_from_token(question_token)
        return prior + self.head(torch.cat([image, asked], dim=1))

    def forward(self, model, batch: Batch):
        features, tiles = _encode(model, batch, "answer_words")
        ids, labels = batch.input_ids, batch.labels
        if self.pool:
            pooled = pool_patch_grid(features, self.pool).transpose(1, 2).flatten(1)
        else:
            pooled = features.mean(dim=1)
        if tiles is not None:
            pooled = _max_over_tiles(pooled, tiles)
        mask = batch.attention_mask
        prompt = (labels == IGNORE_INDEX) & (ids != model.image_token_id)
        if mask is not None:
            prompt &= mask.bool()
        question = self._bag(ids, prompt)
        answer = self._bag(labels.clamp(min=0), labels != IGNORE_INDEX)
        has_answer = answer.sum(1) > 0
        if not bool(has_answer.any()):
            raise DataFormatError("objective 'answer_words': no sample in the batch has a trained answer word")
        target = answer[has_answer] / answer[has_answer].sum(1, keepdim=True)
        token = None
        if self.asks_connector:
            instructions = batch.instructions if tiles is None else per_tile(batch.instructions, tiles)
            token = model.connector.question_token(features, instructions).squeeze(1)
            if tiles is not None:
                token = _max_over_tiles(token, tiles)
        logits = self.logits(pooled, question, token)[has_answer]
        loss = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        return StepOutput(loss, {"loss_answer": loss.detach()})
