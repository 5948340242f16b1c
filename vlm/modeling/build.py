"""The full VLM of a model config: the causal or the encoder-decoder class, by ``model.llm.kind``."""

from __future__ import annotations

from vlm.config import ModelConfig
from vlm.modeling.llm import llm_kind
from vlm.modeling.seq2seq_vlm import Seq2SeqVisionLanguageModel
from vlm.modeling.vlm import VisionLanguageModel


def build_model(cfg: ModelConfig, tokenizer) -> VisionLanguageModel:
    """Build every component from ``cfg``: a :class:`Seq2SeqVisionLanguageModel` for an
    encoder-decoder LLM (``model.llm.kind`` ``seq2seq``, or ``auto`` on such a config), a
    :class:`VisionLanguageModel` otherwise."""
    cls = Seq2SeqVisionLanguageModel if llm_kind(cfg.llm) == "seq2seq" else VisionLanguageModel
    return cls.from_config(cfg, tokenizer)
