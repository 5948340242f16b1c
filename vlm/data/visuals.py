"""A sample's images and video frames in marker order: pixels, frame flags and instructions."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch

from vlm.data.types import IMAGE_TOKEN, VIDEO_TOKEN, Turn


def marker_pattern(image_token: str = IMAGE_TOKEN) -> "re.Pattern[str]":
    """A pattern matching an image or a video marker (splitting keeps the markers)."""
    return re.compile(f"({re.escape(image_token)}|{re.escape(VIDEO_TOKEN)})")


def marker_order(turns: Sequence[Turn], image_token: str = IMAGE_TOKEN) -> List[str]:
    """The markers of ``turns`` in reading order: ``image_token`` or ``<video>`` each."""
    pattern = marker_pattern(image_token)
    return [m for t in turns for m in pattern.findall(t.content)]


@dataclass
class Visuals:
    """What a sample shows, in marker order: one tensor per image or frame, which of them are
    video frames (pooled by the model), each one's instruction, and each video's frame count."""

    tensors: List[torch.Tensor] = field(default_factory=list)
    frames: List[bool] = field(default_factory=list)
    instructions: List[str] = field(default_factory=list)
    frame_counts: List[int] = field(default_factory=list)


def load_visuals(turns: Sequence[Turn], images: Sequence, videos: Sequence, image_token: str,
                 load_image: Callable, load_video: Callable) -> Visuals:
    """Load ``images`` (one per ``image_token``) and ``videos`` (one per ``<video>``; each
    ``load_video`` gives a list of frame tensors) in the order their markers appear in ``turns``.
    An instruction is the text of the marker's turn, markers removed (one per frame for a video)."""
    pattern = marker_pattern(image_token)
    out = Visuals()
    next_image, next_video = iter(images), iter(videos)
    for turn in turns:
        markers = pattern.findall(turn.content)
        if not markers:
            continue
        text = pattern.sub("", turn.content).strip()
        for marker in markers:
            if marker == image_token:
                loaded, is_frame = [load_image(next(next_image))], False
            else:
                loaded, is_frame = list(load_video(next(next_video))), True
                out.frame_counts.append(len(loaded))
            out.tensors += loaded
            out.frames += [is_frame] * len(loaded)
            out.instructions += [text] * len(loaded)
    return out
