"""The record every dataset reader produces: a conversation plus the images it refers to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")


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
    """A conversation and its images, in the order their `<image>` markers appear.

    `meta` carries what evaluation needs (``image_id``, ``question_id``, reference captions,
    VQA answers) and where the record came from (``source``: 'file:line' or 'file#index').
    """

    id: str
    turns: List[Turn]
    images: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        markers = sum(t.content.count(IMAGE_TOKEN) for t in self.turns)
        if markers != len(self.images):
            where = self.meta.get("source", self.id)
            raise ValueError(
                f"{where}: {markers} '{IMAGE_TOKEN}' marker(s) but {len(self.images)} image(s)"
            )
