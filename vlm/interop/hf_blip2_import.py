"""transformers' BLIP-2 folders (causal or T5 LLM) -> a vlm stage output (``vlm import hf-blip2``)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoTokenizer, Blip2ForConditionalGeneration

from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.output_dirs import replacing_output_dir
from vlm.config import COMPONENTS, ModelConfig, Train
from vlm.core.errors import LayoutError
from vlm.interop.blip2 import load_blip2_for_conditional_generation
from vlm.modeling.build import build_model

# config.json bookkeeping that is not an architecture field
_NOT_ARCH = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "id2label",
             "label2id", "return_dict", "output_hidden_states", "output_attentions", "use_cache"}


def _arch(config) -> dict:
    """A transformers sub-config as an inline ``arch`` (its own fields, model_type included); a
    list of stop ids (what ``vlm export`` writes as eos) is left to the tokenizer's eos."""
    return {k: v for k, v in config.to_dict().items()
            if k not in _NOT_ARCH and not k.startswith("_") and not (k.endswith("_token_id") and isinstance(v, list))}


def blip2_model_config(hf, image_token: str, template: str, preprocess: str) -> ModelConfig:
    """The vlm model config of a transformers ``Blip2ForConditionalGeneration``: its ViT as
    ``hf_blip2_vision`` (its post_layernorm is BLIP-2's ln_vision), its Q-Former's sizes, its
    language model inline (``kind`` from ``is_encoder_decoder``)."""
    q = hf.config.qformer_config
    cfg = OmegaConf.structured(ModelConfig)
    cfg.vision.name = "hf_blip2_vision"
    cfg.vision.arch = _arch(hf.config.vision_config)
    cfg.vision.feature_layer = -1
    cfg.vision.keep_cls = True
    cfg.vision.preprocess = preprocess
    cfg.connector.name = "qformer"
    cfg.connector.options = dict(
        num_queries=hf.config.num_query_tokens, num_layers=q.num_hidden_layers, hidden_size=q.hidden_size,
        num_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        max_text_positions=q.max_position_embeddings, cross_attention_freq=q.cross_attention_frequency,
        layer_norm_eps=q.layer_norm_eps, dropout=q.hidden_dropout_prob,
        attention_dropout=q.attention_probs_dropout_prob, vision_layernorm=False)
    text = hf.config.text_config
    cfg.llm.arch = _arch(text)
    cfg.llm.kind = "seq2seq" if text.is_encoder_decoder else "causal"
    cfg.template = template
    cfg.image_token = image_token
    return cfg


def import_hf_blip2(folder: str | Path, out: str | Path, template: str = "blip2_qa", preprocess: str = "resize",
                    overwrite: bool = False) -> Path:
    """Write the local transformers BLIP-2 folder ``folder`` (OPT-style causal or T5 language
    model) as a vlm stage output ``out`` (atomically; a non-empty ``out`` only with
    ``overwrite``); returns ``out``. The Q-Former's text path and stage-1 heads, which such a
    folder does not hold, start at their initial values. InstructBLIP folders are refused."""
    folder = Path(folder)
    model_type = AutoConfig.from_pretrained(str(folder)).model_type
    if model_type != "blip-2":
        raise LayoutError(f"{folder}: config.json model_type is '{model_type}'; vlm import hf-blip2 reads "
                          "'blip-2' folders (InstructBLIP folders are not supported yet)")
    hf = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    token_id = hf.config.image_token_id
    if token_id is None or token_id >= len(tokenizer):
        raise LayoutError(f"{folder}: the model's image_token_id {token_id} is not a token of its tokenizer")
    cfg = blip2_model_config(hf, tokenizer.convert_ids_to_tokens(token_id), template, preprocess)
    model = build_model(cfg, tokenizer)
    load_blip2_for_conditional_generation(model, hf)
    with replacing_output_dir(out, overwrite) as tmp:
        save_model_state(model, tmp, {comp: Train.full for comp in COMPONENTS}, cfg, tokenizer, prior=None)
    return Path(out)
