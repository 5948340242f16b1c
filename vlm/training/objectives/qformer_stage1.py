"""BLIP-2 stage 1: the Q-Former learns to read images without an LLM (objective ``qformer_stage1``).

Three losses on (image, text) pairs, summed; each is logged as ``loss_itc``, ``loss_itm``,
``loss_itg``. Each runs one joint pass of ``[queries; text]`` through the Q-Former under its own
attention mask (True = may attend; rows are the attending positions, columns the attended ones;
Q queries first, then T text tokens, padding columns never attended):

- ITC, :func:`unimodal_mask`: queries see only queries (and cross-attend to the image), text sees
  only text. The normalised projected query outputs and text ``[CLS]`` meet in a shared space;
  similarity = max over queries / learnable temperature; in-batch negatives, gathered (with
  gradient) across processes when distributed.
- ITM, :func:`bidirectional_mask`: every position sees every position. One hard negative per
  sample each way (:func:`sample_hard_negatives`, from the ITC similarities, the positive
  excluded); a 2-way head on the query outputs, averaged over the queries.
- ITG, :func:`multimodal_causal_mask`: ``[DEC]`` replaces ``[CLS]``; queries see queries, text
  token i sees every query and text tokens 0..i. The text is generated from what the queries
  extracted, which forces them to carry it.

The text of a sample is its trained text (``batch.labels``: the caption under the ``plain``
template), decoded with the stage's tokenizer and re-tokenised by the Q-Former's own text path.
The heads live in the connector (retrieval needs them after training), so this objective has no
parameters of its own.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlm.config import ConfigError, Train
from vlm.core.errors import DataFormatError
from vlm.data.batch import Batch
from vlm.data.processor import IGNORE_INDEX
from vlm.modeling.connectors.qformer import QFormer
from vlm.training.objectives.base import Objective, StepOutput

# ---------------------------------------------------------------------------------------------
# the three attention masks


def _key_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """``(B, Q + T)``: which positions exist (queries always, text where not padding)."""
    queries = torch.ones(text_mask.shape[0], num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)


def unimodal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITC: ``(B, Q + T, Q + T)``; queries attend to queries only, text to (real) text only."""
    keys = _key_mask(num_queries, text_mask)
    length = keys.shape[1]
    is_query = torch.arange(length, device=keys.device) < num_queries
    same_side = is_query.unsqueeze(1) == is_query.unsqueeze(0)
    return same_side.unsqueeze(0) & keys.unsqueeze(1)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITM: ``(B, Q + T, Q + T)``; every position attends to every query and every real token."""
    keys = _key_mask(num_queries, text_mask)
    return keys.unsqueeze(1).expand(-1, keys.shape[1], -1).clone()


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: ``(B, Q + T, Q + T)``; queries attend to queries only; text token i attends to every
    query and to real text tokens 0..i."""
    keys = _key_mask(num_queries, text_mask)
    length = keys.shape[1]
    position = torch.arange(length, device=keys.device)
    is_query = position < num_queries
    rows, cols = position.unsqueeze(1), position.unsqueeze(0)
    query_rows = is_query.unsqueeze(1) & is_query.unsqueeze(0)
    text_rows = ~is_query.unsqueeze(1) & (is_query.unsqueeze(0) | (cols <= rows))
    return (query_rows | text_rows).unsqueeze(0) & keys.unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# negatives and gathering


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """For each row of ``similarity`` ``(B, C)``, one column index drawn with probability
    softmax(similarity) over the columns other than the row's positive (``positives[b]``),
    which is never drawn. A floor of 1e-4 keeps every other column possible (as LAVIS)."""
    if similarity.shape[1] < 2:
        raise ValueError("hard negatives need at least two candidates per row")
    weights = F.softmax(similarity.float(), dim=1) + 1e-4
    weights[torch.arange(similarity.shape[0], device=similarity.device), positives] = 0.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batches(tensor: torch.Tensor, with_grad: bool, pad_value=0) -> Tuple[torch.Tensor, int]:
    """Concatenate every process's ``tensor`` along dim 0 and return ``(all, offset)``, where
    ``offset`` is where this process's rows start. Batches may differ in every dimension: they
    are padded with ``pad_value`` to the largest, and trimmed back in dim 0. ``with_grad`` keeps
    the gradient flowing to every process's rows (``torch.distributed.nn.all_gather``).
    In a single process: ``(tensor, 0)``, unchanged."""
    if not _distributed():
        return tensor, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    shape = torch.tensor(tensor.shape, device=tensor.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    largest = torch.stack(shapes).amax(dim=0).tolist()
    padding = []
    for size, target in zip(reversed(tensor.shape), reversed(largest)):
        padding += [0, target - size]
    padded = F.pad(tensor, padding, value=pad_value)
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    rows = [int(s[0]) for s in shapes]
    return torch.cat([part[:n] for part, n in zip(parts, rows)]), sum(rows[:rank])


def contrastive_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor):
    """ITC over the batch of every process: ``(loss, sim_i2t, sim_t2i, targets)``.

    ``image_feats`` ``(B, Q, D)`` and ``text_feat`` ``(B, D)`` are this process's normalised
    embeddings; the other processes' are gathered with their gradient. An image-text
    similarity is the best of the image's Q query similarities, divided by ``temperature``.
    ``sim_i2t`` / ``sim_t2i`` are ``(B, B_all)``; row b's positive is column ``targets[b]``.
    """
    image_all, offset = gather_batches(image_feats, with_grad=True)
    text_all, _ = gather_batches(text_feat, with_grad=True)
    sim_i2t = torch.einsum("bqd,td->btq", image_feats, text_all).amax(-1) / temperature
    sim_t2i = torch.einsum("bd,iqd->biq", text_feat, image_all).amax(-1) / temperature
    targets = torch.arange(image_feats.shape[0], device=image_feats.device) + offset
    loss = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
    return loss, sim_i2t, sim_t2i, targets


def _pad_columns(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


# ---------------------------------------------------------------------------------------------
# the objective


class QFormerStage1(Objective):
    """BLIP-2 stage 1: ``loss = loss_itc + loss_itm + loss_itg`` on the Q-Former, no LLM."""

    trains_matching = True

    def __init__(self, model, tokenizer):
        super().__init__()
        if not isinstance(model.connector, QFormer):
            raise ConfigError(f"objective 'qformer_stage1' needs model.connector.name: qformer; "
                              f"the connector is {type(model.connector).__name__}")
        self.tokenizer = tokenizer

    @classmethod
    def frozen_parameters(cls, model):
        """The LLM projection plays no part here; frozen, DDP does not wait for its gradient."""
        return model.connector.stage1_unused_parameters() if isinstance(model.connector, QFormer) else []

    @classmethod
    def check_stage(cls, stage, where):
        modes = {c: Train(getattr(stage.train, c)) for c in ("vision", "connector", "llm")}
        if modes["connector"] is not Train.full or modes["llm"] is not Train.frozen or modes["vision"] is Train.lora:
            raise ConfigError(f"{where}.train: objective 'qformer_stage1' trains the Q-Former without the LLM "
                              "(connector: full, llm: frozen, vision: frozen or full)")

    def texts(self, labels: torch.Tensor) -> List[str]:
        """Each row's trained text, decoded (special tokens dropped)."""
        texts = []
        for row in labels:
            ids = row[row != IGNORE_INDEX].tolist()
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def image_features(self, model, batch: Batch) -> torch.Tensor:
        """The encoder's features: cached ones when the batch carries them, else computed."""
        if batch.images is None:
            raise DataFormatError("objective 'qformer_stage1' needs samples with images")
        features = batch.images if batch.image_kind == "features" else model.vision(batch.images)
        rows = batch.input_ids.shape[0]
        if features.shape[0] != rows:
            raise DataFormatError(f"objective 'qformer_stage1' needs exactly one image per sample; got "
                                  f"{features.shape[0]} images for {rows} samples")
        return features

    def forward(self, model, batch: Batch):
        qformer: QFormer = model.connector
        features = self.image_features(model, batch)
        ids, mask = qformer.tokenize_texts(self.texts(batch.labels), device=features.device)
        batch_size, num_queries = ids.shape[0], qformer.num_queries

        # ITC: one pass, queries and text blind to each other
        hidden = qformer.encode(features, ids, mask, attention=unimodal_mask(num_queries, mask))
        image_feats = F.normalize(qformer.vision_proj(hidden[:, :num_queries]), dim=-1)  # (B, Q, D)
        text_feat = F.normalize(qformer.text_proj(hidden[:, num_queries]), dim=-1)      # (B, D): [CLS]
        loss_itc, sim_i2t, sim_t2i, targets = contrastive_loss(image_feats, text_feat, qformer.temperature())

        # ITM: positives, and one hard negative image per text and text per image
        if sim_i2t.shape[1] >= 2:
            features_all, _ = gather_batches(features, with_grad=features.requires_grad)
            ids_all, _ = gather_batches(ids, with_grad=False, pad_value=qformer.pad_token_id)
            mask_all, _ = gather_batches(mask, with_grad=False)
            negative_images = sample_hard_negatives(sim_t2i.detach(), targets)
            negative_texts = sample_hard_negatives(sim_i2t.detach(), targets)
            width = ids_all.shape[1]
            local_ids, local_mask = _pad_columns(ids, width, qformer.pad_token_id), _pad_columns(mask, width, 0)
            itm_images = torch.cat([features, features_all[negative_images], features])
            itm_ids = torch.cat([local_ids, local_ids, ids_all[negative_texts]])
            itm_mask = torch.cat([local_mask, local_mask, mask_all[negative_texts]])
            logits = qformer.match_logits(itm_images, itm_ids, itm_mask,
                                          attention=bidirectional_mask(num_queries, itm_mask))
            itm_labels = torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(ids.device)
            loss_itm = F.cross_entropy(logits, itm_labels)
        else:  # one sample in the whole batch: no negative to match against
            loss_itm = qformer.itm_head.weight.sum() * 0.0

        # ITG: [DEC] text generated from the queries, causally
        dec_ids = ids.clone()
        dec_ids[:, 0] = qformer.dec_token_id
        hidden = qformer.encode(features, dec_ids, mask, attention=multimodal_causal_mask(num_queries, mask))
        logits = qformer.lm_head(hidden[:, num_queries:-1])
        targets_itg = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        loss_itg = F.cross_entropy(logits.flatten(0, 1), targets_itg.flatten(), ignore_index=IGNORE_INDEX)

        loss = loss_itc + loss_itm + loss_itg
        return StepOutput(loss, {"loss_itc": loss_itc.detach(), "loss_itm": loss_itm.detach(),
                                 "loss_itg": loss_itg.detach()})
