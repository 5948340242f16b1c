"""transformers' BLIP-2 weights -> vlm components.

``qformer_state_from_hf`` renames a transformers ``Blip2QFormerModel`` state dict into our
``QFormer`` names; ``load_blip2_for_conditional_generation`` copies a whole
``Blip2ForConditionalGeneration`` (vision tower, queries, Q-Former, language projection, LLM)
into a ``VisionLanguageModel`` built with the ``hf_blip2_vision`` encoder and the ``qformer``
connector; ``load_blip2_for_retrieval`` copies a ``Blip2ForImageTextRetrieval`` (Q-Former, text
embeddings, ITC projections, ITM head) into a ``QFormer``; ``load_instructblip_qformer`` an
``InstructBlipQFormerModel`` (and its queries) into an instruction-aware ``QFormer``. The parity tests use them, and so can
anyone with local BLIP-2 weights.
"""

from __future__ import annotations

import re
from typing import Dict, List

import torch

from vlm.interop import sub_state

# (transformers name, ours) inside Q-Former layer i: encoder.layer.i.* -> layers.i.*
_QFORMER_LAYER_RENAMES = [
    ("attention.attention.", "self_attn."),
    ("attention.output.dense.", "self_attn.out."),
    ("attention.output.LayerNorm.", "self_attn.norm."),
    ("crossattention.attention.", "cross_attn."),
    ("crossattention.output.dense.", "cross_attn.out."),
    ("crossattention.output.LayerNorm.", "cross_attn.norm."),
    ("intermediate_query.dense.", "query_ffn.up."),
    ("output_query.dense.", "query_ffn.down."),
    ("output_query.LayerNorm.", "query_ffn.norm."),
    ("intermediate.dense.", "text_ffn.up."),
    ("output.dense.", "text_ffn.down."),
    ("output.LayerNorm.", "text_ffn.norm."),
]
# (transformers pattern, our replacement), applied to every key of a Blip2QFormerModel
_QFORMER_RENAMES = [
    (r"^layernorm\.", "embedding_norm."),
    (r"^embeddings\.layernorm\.", "embedding_norm."),  # InstructBLIP's Q-Former owns its embeddings
    (r"^embeddings\.position_embeddings\.", "position_embeddings."),
] + [(r"^encoder\.layer\.(\d+)\." + re.escape(theirs), r"layers.\1." + ours) for theirs, ours in _QFORMER_LAYER_RENAMES]


def qformer_state_from_hf(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A ``Blip2QFormerModel`` (or ``InstructBlipQFormerModel``, word embeddings excepted) state
    dict in our ``QFormer`` names; ValueError on a key that maps to nothing."""
    mapped = {}
    for key, value in state.items():
        for pattern, replacement in _QFORMER_RENAMES:
            new, count = re.subn(pattern, replacement, key)
            if count:
                mapped[new] = value
                break
        else:
            raise ValueError(f"Blip2QFormerModel key '{key}' has no counterpart in vlm's QFormer")
    return mapped


def _load(module, state: Dict[str, torch.Tensor], allowed_missing: List[str]) -> None:
    """``load_state_dict`` that tolerates only missing keys starting with ``allowed_missing``."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(tuple(allowed_missing))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{type(module).__name__}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")


# what a generation-only checkpoint lacks: the text path and the stage-1 heads
_TEXT_PATH = ["word_embeddings.", "position_embeddings.", "vision_proj.", "text_proj.", "itm_head.",
              "lm_head.", "temp"]


def load_blip2_for_conditional_generation(model, hf) -> None:
    """Copy a transformers ``Blip2ForConditionalGeneration`` into ``model`` (a
    ``VisionLanguageModel`` with an ``hf_blip2_vision`` encoder and a ``qformer`` connector with
    ``vision_layernorm: false``; the LLM of the same class as ``hf.language_model``).

    The Q-Former's text path and stage-1 heads keep their values (such a checkpoint has none);
    so does its text feed-forward network when the checkpoint has none.
    """
    state = hf.state_dict()
    vision = sub_state(state, "vision_model.")
    kept = len(model.vision.model.encoder.layers)
    vision = {k: v for k, v in vision.items()
              if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= kept)}
    _load(model.vision.model, vision, [])
    connector = qformer_state_from_hf(sub_state(state, "qformer."))
    connector["query_tokens"] = state["query_tokens"]
    connector.update({f"proj.{k}": v for k, v in sub_state(state, "language_projection.").items()})
    text_ffn = [f"layers.{i}.text_ffn." for i in range(len(model.connector.layers))]
    _load(model.connector, connector, _TEXT_PATH + text_ffn)
    _load(model.llm, sub_state(state, "language_model."), [])


def load_blip2_for_retrieval(connector, hf) -> None:
    """Copy a transformers ``Blip2ForImageTextRetrieval``'s Q-Former side (queries, Q-Former,
    text embeddings, ITC projections, ITM head) into a ``QFormer`` whose text vocabulary is the
    checkpoint's (its own ``[CLS]`` / ``[DEC]`` rows and the ITG head keep their values)."""
    state = hf.state_dict()
    mapped = qformer_state_from_hf(sub_state(state, "qformer."))
    mapped["query_tokens"] = state["query_tokens"]
    for ours, theirs in (("vision_proj.", "vision_projection."), ("text_proj.", "text_projection."),
                         ("itm_head.", "itm_head."), ("position_embeddings.", "embeddings.position_embeddings.")):
        mapped.update({ours + k: v for k, v in sub_state(state, theirs).items()})
    _copy_word_embeddings(connector, state["embeddings.word_embeddings.weight"])
    _load(connector, mapped, ["word_embeddings.", "lm_head.", "temp", "proj."])


def _copy_word_embeddings(connector, words: torch.Tensor) -> None:
    with torch.no_grad():
        ours = connector.word_embeddings.weight
        if ours.shape[0] < words.shape[0]:
            raise ValueError(f"QFormer text vocabulary ({ours.shape[0] - 2}) is smaller than the checkpoint's "
                             f"({words.shape[0]})")
        ours[: words.shape[0]] = words


def load_instructblip_qformer(connector, qformer, query_tokens: torch.Tensor) -> None:
    """Copy a transformers ``InstructBlipQFormerModel`` (embeddings included) and the model's
    ``query_tokens`` into a ``QFormer`` (``instruction_aware: true``, ``vision_layernorm: false``:
    InstructBLIP's ``ln_vision`` is its vision model's ``post_layernorm``)."""
    state = dict(qformer.state_dict())
    words = state.pop("embeddings.word_embeddings.weight")
    mapped = qformer_state_from_hf(state)
    mapped["query_tokens"] = query_tokens
    _copy_word_embeddings(connector, words)
    _load(connector, mapped, ["word_embeddings.", "vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp",
                              "proj."])


def load_instructblip_for_conditional_generation(model, hf) -> None:
    """Copy a transformers ``InstructBlipForConditionalGeneration`` (vision tower, queries,
    instruction-aware Q-Former with its word embeddings, language projection, LLM: causal or
    T5) into ``model`` (``hf_blip2_vision`` encoder, ``qformer`` connector with
    ``instruction_aware: true`` and ``vision_layernorm: false``, the LLM of the same class as
    ``hf.language_model``). The Q-Former's stage-1 heads keep their values."""
    state = hf.state_dict()
    vision = sub_state(state, "vision_model.")
    kept = len(model.vision.model.encoder.layers)
    vision = {k: v for k, v in vision.items()
              if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= kept)}
    _load(model.vision.model, vision, [])
    load_instructblip_qformer(model.connector, hf.qformer, state["query_tokens"])
    with torch.no_grad():
        for name, value in sub_state(state, "language_projection.").items():
            getattr(model.connector.proj, name).copy_(value)
    _load(model.llm, sub_state(state, "language_model."), [])
