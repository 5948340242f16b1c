"""Vision encoders, by exact name in ``VISION_ENCODERS`` (each imported on first use)."""

from vlm.modeling.vision.base import VisionEncoder
from vlm.modeling.vision.registry import VISION_ENCODERS


def build_vision_encoder(cfg) -> VisionEncoder:
    """Build the encoder named by ``cfg.name`` from its config."""
    return VISION_ENCODERS.get(cfg.name).from_config(cfg)


__all__ = ["VisionEncoder", "VISION_ENCODERS", "build_vision_encoder"]
