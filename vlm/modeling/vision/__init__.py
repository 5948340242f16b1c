"""Vision encoders. Importing this package registers every built-in encoder."""

from vlm.modeling.vision.base import VisionEncoder
from vlm.modeling.vision.registry import VISION_ENCODERS
from vlm.modeling.vision import beit3, hf_blip2, hf_clip, open_clip, timm_vit  # noqa: F401  (registration)


def build_vision_encoder(cfg) -> VisionEncoder:
    """Build the encoder named by ``cfg.name`` from its config."""
    return VISION_ENCODERS.get(cfg.name).from_config(cfg)


__all__ = ["VisionEncoder", "VISION_ENCODERS", "build_vision_encoder"]
