"""What is registered: vision encoders, connectors, chat templates, data formats, preprocessing,
training objectives, evaluation tasks (the one list is ``vlm.wiring.REGISTRIES``)."""

from __future__ import annotations

from typing import Dict, List


def catalog() -> Dict[str, List[str]]:
    """Every registry's exact names, by kind."""
    from vlm.wiring import catalog as wired

    return wired()
