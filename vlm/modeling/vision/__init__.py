"""Vision encoders, by exact name in ``VISION_ENCODERS`` (each imported on first use)."""

from vlm.modeling.vision.base import EncoderContext, VisionEncoder
from vlm.modeling.vision.registry import VISION_ENCODERS


def build_vision_encoder(cfg) -> VisionEncoder:
    """Build the encoder named by ``cfg.name`` (a ``model.vision`` section) from its options and
    the rest of the section (``VisionEncoder.build``)."""
    return VISION_ENCODERS.get(cfg.name).build(cfg.options, EncoderContext.of(cfg))


__all__ = ["EncoderContext", "VisionEncoder", "VISION_ENCODERS", "build_vision_encoder"]
