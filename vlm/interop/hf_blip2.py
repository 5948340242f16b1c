"""vlm -> transformers' ``Blip2ForConditionalGeneration`` (the inverse of ``vlm.interop.blip2``).

A vlm model in BLIP-2's layout (``hf_blip2_vision`` encoder with ``keep_cls``, ``qformer``
connector, any transformers causal LM) is the same network as a transformers BLIP-2 model:

- ``to_hf_blip2(model)`` builds the transformers model holding our weights. BLIP-2's
  ``ln_vision`` is transformers' vision ``post_layernorm``: it is the encoder's own
  (``options.post_layernorm: true`` with the Q-Former's ``vision_layernorm: false``) or the
  Q-Former's ``vision_norm`` (the other way round).
- ``export_hf_blip2(checkpoint, out)`` writes a stage output as a folder that
  ``Blip2ForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained``
  (``Blip2Processor``, ``num_query_tokens`` image tokens) read, with a ``generation_config.json``
  stopping at the template's stop tokens.

``Blip2Processor`` always puts an image's query tokens first (BLIP-2's own layout). vlm places
them where the prompt's ``<image>`` is, so the tokenizer's chat template (vlm's template as
Jinja, an image part written as ``num_query_tokens`` image tokens) gives vlm's exact prompt:
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` -> ``input_ids``, and
``processor.image_processor(images)`` -> ``pixel_values``.

An instruction-aware Q-Former becomes ``InstructBlipForConditionalGeneration`` with an
``InstructBlipProcessor`` whose ``qformer_tokenizer`` writes vlm's Q-Former ids (``[CLS] text
[end]``, vlm's ``[CLS]`` row added as a token); vlm's instruction is the question alone (the
user turn's text without its ``<image>``), so pass that to the ``qformer_tokenizer``.

Not exportable: learned image position embeddings, and BEiT3-query models, which transformers
has no class for (serve those with ``vlm serve``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
)

from vlm.core.errors import LayoutError
from vlm.interop.blip2 import qformer_state_from_hf
from vlm.interop.chat_template import jinja_chat_template
from vlm.interop.hf_export import load_for_export, write_export
from vlm.interop.hf_llava import image_processor
from vlm.modeling.connectors.beit3_query import BEiT3QueryConnector
from vlm.modeling.connectors.qformer import QFormer
from vlm.modeling.vision.hf_blip2 import HFBlip2VisionEncoder
from vlm.modeling.vlm import VisionLanguageModel

SERVE_HINT = "serve it with `vlm serve CHECKPOINT` (OpenAI-compatible) instead"


def _check_layout(model: VisionLanguageModel) -> None:
    if isinstance(model.connector, BEiT3QueryConnector):
        raise LayoutError("model.connector: beit3_query models have no transformers class to export to; "
                          + SERVE_HINT)
    if type(model.connector) is not QFormer:
        raise LayoutError(f"model.connector: BLIP-2 holds a Q-Former (vlm 'qformer'); this model's connector is "
                          f"{type(model.connector).__name__} (export hf-llava takes mlp2x_gelu models)")
    if model.connector.image_position_embeddings is not None:
        raise LayoutError("model.connector.options.image_positions: BLIP-2 has no learned image position "
                          "embeddings; " + SERVE_HINT)
    if not isinstance(model.vision, HFBlip2VisionEncoder) or not model.vision.cfg.keep_cls:
        raise LayoutError(f"model.vision: BLIP-2 holds its own ViT (vlm 'hf_blip2_vision' with keep_cls: true); "
                          f"this model's encoder is {type(model.vision).__name__}"
                          f"{'' if model.vision.cfg.keep_cls else ' without keep_cls'}")
    own = isinstance(model.vision.model.post_layernorm, torch.nn.LayerNorm)
    qformer = isinstance(model.connector.vision_norm, torch.nn.LayerNorm)
    if own == qformer:
        raise LayoutError("BLIP-2 normalises the image features once (ln_vision): use the encoder's "
                          "post_layernorm or the Q-Former's vision_layernorm, not "
                          + ("both" if own else "neither"))
    if qformer and model.connector.vision_norm.eps != model.vision.model.config.layer_norm_eps:
        raise LayoutError(f"model.connector: the Q-Former's vision LayerNorm eps {model.connector.vision_norm.eps} "
                          f"differs from the vision tower's {model.vision.model.config.layer_norm_eps}")


def to_hf_blip2(model: VisionLanguageModel):
    """A ``Blip2ForConditionalGeneration`` (``InstructBlipForConditionalGeneration`` when the
    Q-Former reads instructions) holding ``model``'s weights (fp32 copies on the CPU)."""
    _check_layout(model)
    connector, vision = model.connector, model.vision.model
    layer = connector.layers[0]
    instruct = connector.instruction_aware
    vision_config = {**vision.config.to_dict(), "num_hidden_layers": len(vision.encoder.layers)}
    sizes = dict(hidden_size=connector.query_tokens.shape[-1], num_hidden_layers=len(connector.layers),
                 num_attention_heads=layer.self_attn.num_heads, intermediate_size=layer.query_ffn.up.out_features,
                 cross_attention_frequency=connector.opts.cross_attention_freq,
                 encoder_hidden_size=vision.config.hidden_size, layer_norm_eps=connector.embedding_norm.eps)
    common = dict(vision_config=vision_config, text_config=model.llm.config.to_dict(),
                  num_query_tokens=connector.num_queries, image_token_index=model.image_token_id)
    if instruct:
        qformer_config = InstructBlipQFormerConfig(
            vocab_size=connector.word_embeddings.num_embeddings,
            max_position_embeddings=connector.position_embeddings.num_embeddings, **sizes)
        hf = InstructBlipForConditionalGeneration(InstructBlipConfig(qformer_config=qformer_config.to_dict(), **common))
    else:
        hf = Blip2ForConditionalGeneration(Blip2Config(qformer_config=Blip2QFormerConfig(**sizes).to_dict(), **common))
    config = hf.config
    ours = connector.state_dict()
    state = {}
    for key in hf.qformer.state_dict():
        if key == "embeddings.word_embeddings.weight":
            state[f"qformer.{key}"] = ours["word_embeddings.weight"]
        elif not key.endswith("position_ids"):
            state[f"qformer.{key}"] = ours[next(iter(qformer_state_from_hf({key: None})))]
    tower = dict(vision.state_dict())
    if isinstance(connector.vision_norm, torch.nn.LayerNorm):
        tower.update({f"post_layernorm.{k}": v for k, v in connector.vision_norm.state_dict().items()})
    state.update({f"vision_model.{k}": v for k, v in tower.items()})
    state["query_tokens"] = ours["query_tokens"]
    state.update({f"language_projection.{k}": ours[f"proj.{k}"] for k in ("weight", "bias")})
    state.update({f"language_model.{k}": v for k, v in model.llm.state_dict().items()})
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(config.text_config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight")) and not k.endswith("position_ids")]
    if missing or unexpected:
        raise LayoutError(f"weights do not fit transformers' BLIP-2: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.eval()


QFORMER_CLS = "<vlm_qformer_cls>"


def qformer_tokenizer(connector, folder: Path):
    """The Q-Former's text tokenizer writing ids as vlm's ``QFormer.tokenize_texts`` does:
    ``[CLS] text [end]`` (vlm's ``[CLS]`` row is the one after the tokenizer's vocabulary, a
    token added here), at most ``max_text_tokens``. Saved to ``folder`` and loaded back."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    connector.text_tokenizer.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens([QFORMER_CLS], special_tokens=True)
    if tokenizer.convert_tokens_to_ids(QFORMER_CLS) != connector.cls_token_id:
        raise LayoutError(f"model.connector: the Q-Former's [CLS] row {connector.cls_token_id} cannot be a token of its "
                          "tokenizer; " + SERVE_HINT)
    end = connector.end_token_id
    template = f"{QFORMER_CLS} $A" + (f" {tokenizer.convert_ids_to_tokens(end)}" if end is not None else "")
    special = [(QFORMER_CLS, connector.cls_token_id)] + ([(tokenizer.convert_ids_to_tokens(end), end)]
                                                          if end is not None else [])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=special)
    tokenizer.model_max_length = connector.max_text_tokens
    tokenizer.truncation_side = "right"
    tokenizer.pad_token_id = connector.pad_token_id
    tokenizer.chat_template = None
    return tokenizer


def export_hf_blip2(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                    overwrite: bool = False) -> Path:
    """Write the stage output ``checkpoint`` as a transformers BLIP-2 (or InstructBLIP) folder
    ``out`` (atomically; a non-empty ``out`` only with ``overwrite``): weights in one dtype, the
    processor and the generation config; returns ``out``."""
    model, tokenizer, model_cfg, hf, target = load_for_export(checkpoint, out, dtype, overwrite, to_hf_blip2,
                                                              ("text_config", "vision_config", "qformer_config"))
    # Blip2ForConditionalGeneration.generate hands over to its language model, whose generation
    # config is built from text_config on load: the stop ids must be there too
    hf.config.text_config.eos_token_id = list(hf.generation_config.eos_token_id)
    hf.language_model.generation_config = hf.generation_config
    strategy = model_cfg.vision.preprocess or model.vision.default_preprocess
    # an image part becomes the queries' placeholders, where vlm's template puts <image>
    tokenizer.chat_template = jinja_chat_template(model_cfg.template, tokenizer, model_cfg.system_prompt,
                                                  model_cfg.image_token,
                                                  image_text=model_cfg.image_token * model.num_image_tokens,
                                                  image_placement=model_cfg.get("image_placement"))
    images = image_processor(strategy, model.vision.image_size, model.vision.mean, model.vision.std)
    if model.connector.instruction_aware:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            processor = InstructBlipProcessor(images, tokenizer, qformer_tokenizer(model.connector, Path(scratch)),
                                              num_query_tokens=model.num_image_tokens)
    else:
        processor = Blip2Processor(images, tokenizer, num_query_tokens=model.num_image_tokens)
    details = {"num_query_tokens": model.num_image_tokens, "preprocess": strategy,
               "instruction_aware": model.connector.instruction_aware}
    return write_export(out, overwrite, hf, processor, checkpoint, model, model_cfg, target, details)
