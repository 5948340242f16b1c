"""The processor that matches a built model: its image transform, visual tokens and template."""

from __future__ import annotations

from typing import Optional

from vlm.data.images import DEFAULT_MAX_PIXELS
from vlm.data.processor import VLMProcessor
from vlm.data.templates import build_template
from vlm.data.video import FrameSampling
from vlm.modeling.vlm import VisionLanguageModel


def build_processor(model: VisionLanguageModel, tokenizer, model_cfg, template: Optional[str] = None,
                    max_length: int = 2048, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                    max_visual_tokens: Optional[int] = None) -> VLMProcessor:
    """A processor matching ``model``: its image transform and its number of image tokens (with
    AnyRes tiling, its tiling spec); ``max_visual_tokens``: the per-sample budget."""
    return VLMProcessor(
        tokenizer,
        build_template(template or model_cfg.template, tokenizer, model_cfg.system_prompt),
        model.vision.image_transform(),
        model.num_image_tokens,
        image_token=model_cfg.image_token,
        max_length=max_length,
        max_image_pixels=max_image_pixels,
        tiling=model.tiling,
        max_visual_tokens=max_visual_tokens,
        num_frame_tokens=model.num_frame_tokens,
        frame_sampling=FrameSampling(model_cfg.video.num_frames, model_cfg.video.fps),
        image_placement=model_cfg.get("image_placement"),
        video_newline=model.video_newline,
    )
