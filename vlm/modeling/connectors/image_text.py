"""The ImageTextMatcher interface: what retrieval and stage-1 objectives need from a connector."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence, Tuple

import torch


class ImageTextMatcher(ABC):
    """Embeds images and texts into one space (ITC) and scores image-text pairs jointly (ITM).

    Images come in as the vision encoder's features ``(B, N, vision_dim)``.
    """

    @abstractmethod
    def tokenize_texts(self, texts: Sequence[str], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Texts -> right-padded ``(input_ids, attention_mask)`` of the matcher's own text path."""

    @abstractmethod
    def image_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``(B, Q, D)``; Q >= 1 vectors per image."""

    @abstractmethod
    def text_embeddings(self, input_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``(B, D)``."""

    @abstractmethod
    def match_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> torch.Tensor:
        """``(B, 2)`` logits (no match, match) for each image-text pair."""

    @abstractmethod
    def retrieval_temperature(self) -> float:
        """The ITC temperature: a similarity divided by it is the ITC logit the heads trained."""


def similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """``(n_images, n_texts)`` ITC similarity: for each pair, the best of the image's Q vectors."""
    return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)
