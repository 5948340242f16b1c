"""vlm -> transformers' ``LlavaOnevisionForConditionalGeneration`` and its processor (images, video).

A tiled vlm model in the LLaVA layout (see :mod:`vlm.interop.hf_llava_next`, whose helpers build
the weights and the template) is LLaVA-OneVision when it also shows each image of a multi-image
sample as its overview alone (``model.vision.tiling.multi_image: base``), pools video frames by 2
(``model.video.pool: 2``) and ends each video with the newline (``model.video.newline``).
OneVision's ``anyres_max_N`` feature interpolation is never triggered: the export sets ``N`` to
the largest grid's tile count. transformers gives a video its own placeholder token: the export
adds ``<video>`` to the tokenizer, on a new vocabulary row (when the embedding has no spare one)
that copies the image token's rows, so greedy decoding still picks what vlm picks. What OneVision
cannot express is refused with one line (:func:`llava_onevision_refusal`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.video_processing_llava_onevision import (
    LlavaOnevisionVideoProcessor,
)

from vlm.core.errors import LayoutError
from vlm.data.types import VIDEO_TOKEN
from vlm.interop.hf_export import load_for_export, write_export
from vlm.interop.hf_llava import _check_layout, export_chat_template
from vlm.interop.hf_llava_next import (
    load_tiled_state,
    tiled_state,
    tiled_vision_config,
    tiling_refusal,
)
from vlm.modeling.vlm import VisionLanguageModel

ONEVISION_VIDEO_POOL = 2  # transformers' apply_pooling: every frame's grid to ceil(side / 2)


def llava_onevision_refusal(model: VisionLanguageModel) -> Optional[str]:
    """Why transformers' LLaVA-OneVision cannot hold ``model``'s image and video layout, or None."""
    refusal = tiling_refusal(model, "LLaVA-OneVision")
    if refusal:
        return refusal
    if model.tiling.multi_image != "base":
        return (f"model.vision.tiling.multi_image = {model.tiling.multi_image}: LLaVA-OneVision shows each image "
                "of a multi-image prompt as its overview alone (multi_image: base)")
    if model.video_pool != ONEVISION_VIDEO_POOL:
        return (f"model.video.pool = {model.video_pool}: LLaVA-OneVision pools every video frame by "
                f"{ONEVISION_VIDEO_POOL} (bilinear)")
    if not model.video_newline:
        return "model.video.newline = false: LLaVA-OneVision ends every video with image_newline"
    return None


def anyres_max(model: VisionLanguageModel) -> str:
    """OneVision's ``vision_aspect_ratio`` whose interpolation never applies to ``model``'s grids
    (``anyres_max_N``, N the most tiles of a pinpoint: the unpadded map never exceeds N tiles)."""
    size = model.tiling.image_size
    return f"anyres_max_{max((h // size) * (w // size) for h, w in model.tiling.pinpoints)}"


def video_token_id(tokenizer) -> int:
    """The id of ``<video>`` in ``tokenizer``, added as a special token when it has none."""
    if VIDEO_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([VIDEO_TOKEN], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)


def _grown(state: Dict[str, torch.Tensor], names, rows: int, copy_row: int) -> Dict[str, torch.Tensor]:
    """``state`` with the matrices ``names`` grown to ``rows`` rows, each new one a copy of ``copy_row``."""
    for name in names:
        weight = state[name]
        extra = weight[copy_row].expand(rows - weight.shape[0], -1)
        state[name] = torch.cat([weight, extra])
    return state


def to_hf_llava_onevision(model: VisionLanguageModel, tokenizer) -> LlavaOnevisionForConditionalGeneration:
    """A ``LlavaOnevisionForConditionalGeneration`` holding ``model``'s weights (fp32, CPU), its
    video token ``<video>`` added to ``tokenizer``; LayoutError with one line for a layout it
    cannot hold."""
    _check_layout(model)
    refusal = llava_onevision_refusal(model)
    if refusal:
        raise LayoutError(refusal)
    video_id = video_token_id(tokenizer)
    text_config = copy.deepcopy(model.llm.config.get_text_config())
    state = tiled_state(model)
    if video_id >= text_config.vocab_size:  # no spare row: one more, as the image token's (ties go to it)
        embedding = next(f"model.language_model.{name}" for name, p in model.llm.base_model.named_parameters()
                         if p is model.llm.get_input_embeddings().weight)
        names = [embedding] + (["lm_head.weight"] if "lm_head.weight" in state else [])
        state = _grown(state, dict.fromkeys(names), video_id + 1, model.image_token_id)
        text_config.vocab_size = video_id + 1
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    config = LlavaOnevisionConfig(vision_config=tiled_vision_config(model), text_config=text_config,
                                  image_token_id=model.image_token_id, video_token_id=video_id,
                                  projector_hidden_act="gelu", vision_feature_layer=-1,
                                  vision_feature_select_strategy="default",
                                  image_grid_pinpoints=[list(p) for p in model.tiling.pinpoints],
                                  vision_aspect_ratio=anyres_max(model),
                                  multimodal_projector_bias=model.connector.proj[0].bias is not None,
                                  tie_word_embeddings=tied)
    return load_tiled_state(LlavaOnevisionForConditionalGeneration(config), state, "LlavaOnevision")


def build_llava_onevision_processor(model: VisionLanguageModel, tokenizer, model_cfg) -> LlavaOnevisionProcessor:
    """The ``LlavaOnevisionProcessor`` of an exported model: vlm's tiling (PIL, bicubic), frames
    resized to the encoder's size, its chat template as Jinja (video parts as ``<video>``) and
    the placeholder counts vlm's processor computes."""
    spec = model.tiling
    square = {"height": spec.image_size, "width": spec.image_size}
    pixels = dict(size=square, resample=3, do_resize=True, do_rescale=True, do_normalize=True,
                  image_mean=list(spec.mean), image_std=list(spec.std), do_convert_rgb=True)
    images = LlavaOnevisionImageProcessorPil(image_grid_pinpoints=[list(p) for p in spec.pinpoints],
                                             do_center_crop=False, do_pad=True, **pixels)
    videos = LlavaOnevisionVideoProcessor(do_center_crop=False, do_sample_frames=False, **pixels)
    template = export_chat_template(tokenizer, model_cfg, video_token=VIDEO_TOKEN)
    return LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                   num_image_tokens=spec.grid * spec.grid + 1,  # CLIP's class token, dropped
                                   vision_feature_select_strategy="default", chat_template=template,
                                   image_token=model_cfg.image_token, video_token=VIDEO_TOKEN,
                                   vision_aspect_ratio=anyres_max(model))


def export_hf_llava_onevision(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                              overwrite: bool = False) -> Path:
    """Write the stage output ``checkpoint`` (a tiled LLaVA-layout model with OneVision's
    multi-image and video layout) as a transformers LLaVA-OneVision folder ``out`` (atomically; a
    non-empty ``out`` only with ``overwrite``); returns ``out``."""
    model, tokenizer, model_cfg, hf, target = load_for_export(checkpoint, out, dtype, overwrite, to_hf_llava_onevision,
                                                              ("text_config", "vision_config"), with_tokenizer=True)
    processor = build_llava_onevision_processor(model, tokenizer, model_cfg)
    details = {"tiling": {"grid_pinpoints": [list(p) for p in model.tiling.pinpoints], "newline": True,
                          "multi_image": "base", "vision_aspect_ratio": anyres_max(model)},
               "video": {"pool": ONEVISION_VIDEO_POOL, "newline": True, "video_token": VIDEO_TOKEN,
                         "video_token_id": hf.config.video_token_id},
               "image_processor": True}
    return write_export(out, overwrite, hf, processor, checkpoint, model, model_cfg, target, details)
