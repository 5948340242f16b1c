"""Where a prompt's images stand: first in their turn, or where their markers are."""

from __future__ import annotations

from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from vlm.config import ModelConfig
from vlm.core.errors import ConfigError
from vlm.data.types import IMAGE_TOKEN, Sample, Turn
from vlm.data.visuals import marker_pattern

# "first": each user turn's images and videos before its text (single-image training, LLaVA-1.5);
# "positional": exactly where their markers stand (interleaved multi-image training)
PLACEMENTS = ("first", "positional")


def check_placement(value: Optional[str], where: str = "model.image_placement") -> None:
    """ConfigError naming ``where`` for a placement other than null, first or positional."""
    if value is not None and value not in PLACEMENTS:
        raise ConfigError(f"{where} = {value!r}: must be one of {list(PLACEMENTS)} (or null: recorded at training)")


def placement_of(samples: Sequence[Sample], image_token: str = IMAGE_TOKEN) -> str:
    """The placement a model trained on ``samples`` saw: ``positional`` when some sample shows
    several images or videos, or a marker anywhere but at the start of a user turn; else
    ``first``."""
    pattern = marker_pattern(image_token)
    for sample in samples:
        if len(sample.images) + len(sample.videos) > 1:
            return "positional"
        for turn in sample.turns:
            markers = pattern.findall(turn.content)
            if markers and (turn.role != "user" or len(_leading_markers(turn.content, pattern)) != len(markers)):
                return "positional"
    return "first"


def _leading_markers(content: str, pattern) -> List[str]:
    """The markers before any other text of ``content``."""
    leading = []
    for piece in pattern.split(content):
        if pattern.fullmatch(piece):
            leading.append(piece)
        elif piece.strip():
            break
    return leading


def place_first(content: str, pattern) -> str:
    """``content`` with its markers moved to its front, in order, one per line."""
    markers = pattern.findall(content)
    if not markers:
        return content
    return "".join(f"{m}\n" for m in markers) + pattern.sub("", content).strip()


def place_visuals(turns: Sequence[Turn], placement: Optional[str], image_token: str = IMAGE_TOKEN) -> List[Turn]:
    """``turns`` as a model with ``placement`` saw them in training: ``first`` moves each user
    turn's markers before its text (keeping their order); ``positional`` or null leaves them."""
    if placement != "first":
        return list(turns)
    pattern = marker_pattern(image_token)
    return [Turn(t.role, place_first(t.content, pattern)) if t.role == "user" else t for t in turns]


def with_recorded_placement(model_cfg, samples: Sequence[Sample]):
    """``model_cfg`` to save with a stage's weights: its ``image_placement``, or when that is
    null, the placement of the stage's training ``samples`` (:func:`placement_of`)."""
    if model_cfg.get("image_placement") is not None:
        return model_cfg
    # resolved first: the node's interpolations may point into the rest of the run config
    recorded = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.to_container(model_cfg, resolve=True))
    recorded.image_placement = placement_of(samples, model_cfg.image_token)
    return recorded
