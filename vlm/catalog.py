"""What is registered: vision encoders, connectors, chat templates, data formats, preprocessing,
training objectives."""

from __future__ import annotations

from typing import Dict, List


def catalog() -> Dict[str, List[str]]:
    """Every registry's exact names, by kind."""
    from vlm.data.formats import READERS
    from vlm.data.image_transforms import PREPROCESSING
    from vlm.data.templates import TEMPLATES
    from vlm.modeling.connectors import CONNECTORS
    from vlm.modeling.vision import VISION_ENCODERS
    from vlm.training.objectives import OBJECTIVES

    return {
        "vision_encoders": VISION_ENCODERS.names(),
        "connectors": CONNECTORS.names(),
        "templates": TEMPLATES.names(),
        "data_formats": READERS.names(),
        "preprocessing": PREPROCESSING.names(),
        "objectives": OBJECTIVES.names(),
    }
