"""transformers' BLIP-2 / InstructBLIP folders (causal or T5 LLM) -> a vlm stage output (vlm import)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
)

from vlm.checkpoint.components import CONNECTOR_TOKENIZER, save_model_state
from vlm.checkpoint.output_dirs import replacing_output_dir
from vlm.config import COMPONENTS, ModelConfig, Train
from vlm.core.errors import LayoutError
from vlm.interop.blip2 import (
    load_blip2_for_conditional_generation,
    load_instructblip_for_conditional_generation,
)
from vlm.modeling.build import build_model

# the folder's declared model_type -> (transformers class, the paper's prompt template)
FAMILIES = {"blip-2": (Blip2ForConditionalGeneration, "blip2_qa"),
            "instructblip": (InstructBlipForConditionalGeneration, "instructblip")}

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


def import_hf_blip2(folder: str | Path, out: str | Path, template: str | None = None, preprocess: str = "resize",
                    overwrite: bool = False) -> Path:
    """Write the local transformers BLIP-2 or InstructBLIP folder ``folder`` (its config.json's
    ``model_type``; OPT-style causal or T5 language model) as a vlm stage output ``out``
    (atomically; a non-empty ``out`` only with ``overwrite``); returns ``out``. ``template``
    defaults to the paper's (``blip2_qa``, ``instructblip``). BLIP-2: the Q-Former's text path and
    stage-1 heads, which such a folder does not hold, start at their initial values.
    InstructBLIP: the Q-Former reads the instruction with the processor's ``qformer_tokenizer``
    (carried in ``out`` as ``connector_tokenizer/``), framed as that tokenizer frames it."""
    folder = Path(folder)
    model_type = AutoConfig.from_pretrained(str(folder)).model_type
    if model_type not in FAMILIES:
        raise LayoutError(f"{folder}: config.json model_type is '{model_type}'; vlm import hf-blip2 reads "
                          f"{' or '.join(repr(t) for t in FAMILIES)} folders")
    hf_class, paper_template = FAMILIES[model_type]
    hf = hf_class.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    token_id = hf.config.image_token_id
    if token_id is None or token_id >= len(tokenizer):
        raise LayoutError(f"{folder}: the model's image_token_id {token_id} is not a token of its tokenizer")
    cfg = blip2_model_config(hf, tokenizer.convert_ids_to_tokens(token_id), template or paper_template, preprocess)
    with replacing_output_dir(out, overwrite) as tmp:
        if model_type == "instructblip":
            _instruction_aware(cfg, hf, folder, tmp / CONNECTOR_TOKENIZER)
        model = build_model(cfg, tokenizer)
        if model_type == "instructblip":
            try:
                load_instructblip_for_conditional_generation(model, hf)
            except ValueError as exc:
                raise LayoutError(f"{folder}: {exc}") from None
            # model.yaml names where the carried tokenizer will be (load_pretrained reads it there)
            cfg.connector.options.text_tokenizer = str(Path(out).resolve() / CONNECTOR_TOKENIZER)
        else:
            load_blip2_for_conditional_generation(model, hf)
        save_model_state(model, tmp, {comp: Train.full for comp in COMPONENTS}, cfg, tokenizer, prior=None)
    return Path(out)


def _instruction_aware(cfg, hf, folder: Path, text_tokenizer: Path) -> None:
    """Make ``cfg``'s Q-Former InstructBLIP's: it reads the instruction with the folder's
    ``qformer_tokenizer`` (saved to ``text_tokenizer``), at most as many tokens as that tokenizer
    and the Q-Former's positions allow."""
    qformer_tokenizer = getattr(AutoProcessor.from_pretrained(str(folder)), "qformer_tokenizer", None)
    if qformer_tokenizer is None:
        raise LayoutError(f"{folder}: an InstructBLIP folder needs its processor's qformer_tokenizer "
                          "(InstructBlipProcessor.save_pretrained writes it)")
    qformer_tokenizer.save_pretrained(str(text_tokenizer))
    positions = hf.config.qformer_config.max_position_embeddings
    cfg.connector.options.update(instruction_aware=True, text_specials=True, text_tokenizer=str(text_tokenizer),
                                 max_text_tokens=min(int(qformer_tokenizer.model_max_length), positions))
