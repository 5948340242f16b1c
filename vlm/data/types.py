"""The record every dataset reader produces: a conversation plus the images it refers to."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

from vlm.core.errors import DataFormatError

# the default image marker in conversation texts; a model's ``image_token`` replaces it
IMAGE_TOKEN = "<image>"
# the video marker in conversation texts: the processor expands it into its frames' visual tokens
VIDEO_TOKEN = "<video>"
_marker: contextvars.ContextVar[str] = contextvars.ContextVar("vlm_image_marker", default=IMAGE_TOKEN)


def image_marker() -> str:
    """The image marker samples are read with: the model's ``image_token`` inside
    :func:`marking_images_with`, else ``<image>``."""
    return _marker.get()


@contextlib.contextmanager
def marking_images_with(token: str) -> Iterator[None]:
    """Read (and check) samples whose texts mark images with ``token``."""
    reset = _marker.set(token)
    try:
        yield
    finally:
        _marker.reset(reset)
ROLES = ("system", "user", "assistant")


class EmbeddedImage(str):
    """An image whose encoded bytes travel with the sample (a shard's member, a dataset cell); the
    string is its name for messages (``shard.tar#key.jpg``), ``data`` the file's bytes."""

    data: bytes

    def __new__(cls, name: str, data: bytes) -> "EmbeddedImage":
        image = super().__new__(cls, name)
        image.data = data
        return image

    def __reduce__(self):
        return EmbeddedImage, (str(self), self.data)



@dataclass
class Turn:
    """One message of a conversation. `role` is 'system', 'user' or 'assistant'."""

    role: str
    content: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown role '{self.role}'; expected one of {ROLES}")


@dataclass
class Sample:
    """A conversation and its images, in the order their `<image>` markers appear, and its
    videos (a file, a folder of frames or a list of PIL frames), in the order of `<video>`.

    `meta` carries what evaluation needs (``image_id``, ``question_id``, reference captions,
    VQA answers) and where the record came from (``source``: 'file:line' or 'file#index').
    """

    id: str
    turns: List[Turn]
    images: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)
    videos: List[Any] = field(default_factory=list)
    # this sample's visual-token budget, from its dataset's ``data.max_visual_tokens``; None: the
    # stage's (``stages.<name>.max_visual_tokens``, held by the processor)
    max_visual_tokens: Optional[int] = None

    def __post_init__(self):
        where = self.meta.get("source", self.id)
        for marker, visuals, noun in ((image_marker(), self.images, "image"), (VIDEO_TOKEN, self.videos, "video")):
            markers = sum(t.content.count(marker) for t in self.turns)
            if markers != len(visuals):
                raise DataFormatError(f"{where}: {markers} '{marker}' marker(s) but {len(visuals)} {noun}(s)")
