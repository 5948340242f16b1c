"""vlm -> transformers' ``LlavaNextForConditionalGeneration`` and ``LlavaNextProcessor`` (AnyRes).

A vlm model in the LLaVA layout (``hf_clip``, ``mlp2x_gelu``, a causal LM; see
:mod:`vlm.interop.hf_llava`) with ``model.vision.tiling`` is LLaVA-NeXT: the same tiles, grid
choice, unpadding and ``image_newline``. ``to_hf_llava_next`` builds the transformers model with
our weights; ``export_hf_llava_next`` writes a stage output as a folder that
``LlavaNextForConditionalGeneration`` and ``AutoProcessor`` load as they are. What LLaVA-NeXT
cannot express is refused with one line (:func:`llava_next_refusal`): tiling off, pooling per
tile (``pool_stride`` > 1), no newline token, multi-image samples shown as overviews only.
The helpers that build the tiled transformers weights and template (:func:`tiling_refusal`,
:func:`tiled_vision_config`, :func:`tiled_state`, :func:`load_tiled_state`) serve
``vlm.interop.hf_llava_onevision`` too; the chat template, with the model's image placement, is
:func:`vlm.interop.hf_llava.export_chat_template`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)

from vlm.core.errors import LayoutError
from vlm.interop.hf_export import load_for_export, write_export
from vlm.interop.hf_llava import _check_layout, _renamed, export_chat_template
from vlm.modeling.vlm import VisionLanguageModel


def tiling_refusal(model: VisionLanguageModel, target: str) -> Optional[str]:
    """Why transformers' tiled LLaVA ``target`` (its name in the line) cannot hold ``model``'s
    image tiling, or None: it needs tiling, no pooling per tile and the row-end newline."""
    spec = model.tiling
    if spec is None:
        return f"model.vision.tiling: not enabled; {target} tiles every image (export an untiled model as hf-llava)"
    if spec.pool_stride != 1:
        return (f"model.vision.tiling.pool_stride = {spec.pool_stride}: {target} pools no tile "
                "(OneVision-style pooling has no LlavaNext equivalent)")
    if not spec.newline:
        return f"model.vision.tiling.newline = false: {target} always ends each row with image_newline"
    return None


def llava_next_refusal(model: VisionLanguageModel) -> Optional[str]:
    """Why transformers' LLaVA-NeXT cannot hold ``model``'s tiling, or None."""
    refusal = tiling_refusal(model, "LLaVA-NeXT")
    if refusal is None and model.tiling.multi_image != "tiled":
        return (f"model.vision.tiling.multi_image = {model.tiling.multi_image}: LLaVA-NeXT tiles every image of "
                "a multi-image prompt (export it as hf-llava-onevision)")
    return refusal


def tiled_vision_config(model: VisionLanguageModel) -> CLIPVisionConfig:
    """The CLIP vision config of ``model``'s encoder, with only the blocks it keeps."""
    vision = model.vision.model
    return CLIPVisionConfig(**{**vision.config.to_dict(), "num_hidden_layers": len(vision.encoder.layers)})


def tiled_state(model: VisionLanguageModel) -> Dict[str, torch.Tensor]:
    """``model``'s weights under transformers' tiled LLaVA names (LlavaNext, LlavaOnevision),
    fp32 copies on the CPU: tower (an identity ``post_layernorm``), projector, LM, newline, head."""
    vision = model.vision.model
    tower = {k: v for k, v in vision.state_dict().items() if not k.startswith("post_layernorm")}
    hidden = vision.config.hidden_size
    tower["post_layernorm.weight"] = torch.ones(hidden)  # never applied by us: identity
    tower["post_layernorm.bias"] = torch.zeros(hidden)
    state = {f"model.vision_tower.{k}": v for k, v in tower.items()}
    connector = {k: v for k, v in model.connector.state_dict().items() if k != "image_newline"}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in _renamed(connector, to_hf=True).items()})
    state.update({f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()})
    state["model.image_newline"] = model.connector.image_newline
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    return {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}


def load_tiled_state(hf, state: Dict[str, torch.Tensor], name: str):
    """``hf`` (in eval mode) holding ``state``; LayoutError naming ``name`` when the weights do not fit."""
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not hf.config.tie_word_embeddings]
    if missing or unexpected:
        raise LayoutError(f"weights do not fit transformers' {name}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return hf.eval()


def to_hf_llava_next(model: VisionLanguageModel) -> LlavaNextForConditionalGeneration:
    """A ``LlavaNextForConditionalGeneration`` holding ``model``'s weights (fp32, CPU);
    LayoutError with one line for a layout it cannot hold."""
    _check_layout(model)
    refusal = llava_next_refusal(model)
    if refusal:
        raise LayoutError(refusal)
    text_config = model.llm.config.get_text_config()
    config = LlavaNextConfig(vision_config=tiled_vision_config(model), text_config=text_config,
                             image_token_id=model.image_token_id, projector_hidden_act="gelu",
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints],
                             multimodal_projector_bias=model.connector.proj[0].bias is not None,
                             tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    return load_tiled_state(LlavaNextForConditionalGeneration(config), tiled_state(model), "LlavaNext")


def image_processor(model: VisionLanguageModel) -> LlavaNextImageProcessorPil:
    """LLaVA-NeXT's image processor (PIL backend, bicubic) tiling as vlm does
    (``vlm.data.anyres.tile_pixels``: the same pixels), with the model's grids, mean and std."""
    spec = model.tiling
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=[list(p) for p in spec.pinpoints], resample=3, do_resize=True, do_center_crop=True,
        do_rescale=True, do_normalize=True, image_mean=list(spec.mean), image_std=list(spec.std),
        do_convert_rgb=True, do_pad=True)


def build_llava_next_processor(model: VisionLanguageModel, tokenizer, model_cfg) -> LlavaNextProcessor:
    """The ``LlavaNextProcessor`` of an exported model: vlm's tiling, its chat template as Jinja
    and the placeholder count per image that vlm's processor computes."""
    template = export_chat_template(tokenizer, model_cfg)
    return LlavaNextProcessor(image_processor=image_processor(model), tokenizer=tokenizer,
                              patch_size=model.vision.model.config.patch_size,
                              vision_feature_select_strategy="default", chat_template=template,
                              image_token=model_cfg.image_token, num_additional_image_tokens=1)


def export_hf_llava_next(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                         overwrite: bool = False) -> Path:
    """Write the stage output ``checkpoint`` (a tiled LLaVA-layout model) as a transformers
    LLaVA-NeXT folder ``out`` (atomically; a non-empty ``out`` only with ``overwrite``); returns ``out``."""
    model, tokenizer, model_cfg, hf, target = load_for_export(checkpoint, out, dtype, overwrite, to_hf_llava_next,
                                                              ("text_config", "vision_config"))
    processor = build_llava_next_processor(model, tokenizer, model_cfg)
    details = {"tiling": {"grid_pinpoints": [list(p) for p in model.tiling.pinpoints], "newline": True},
               "image_processor": True}
    return write_export(out, overwrite, hf, processor, checkpoint, model, model_cfg, target, details)
