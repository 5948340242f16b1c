"""The registry of vision encoders, by exact name."""

from vlm.registry import Registry

VISION_ENCODERS: Registry = Registry("vision encoder")
