"""The Connector interface: vision features -> visual tokens of the LLM's width."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional

import torch
from torch import nn


class Connector(nn.Module, ABC):
    """Maps ``(B, N, vision_dim)`` features to ``(B, K, llm_dim)`` visual tokens.

    ``num_tokens(N)`` gives K; the processor asks for it so that nobody guesses how many
    placeholders an image needs. Subclasses may declare an ``Options`` dataclass.
    """

    Options: ClassVar[Optional[type]] = None
    # False for connectors that run the encoder themselves (``encode_images`` overridden): their
    # visual tokens are not a function of the encoder's features, so no feature cache applies
    reads_features: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def from_config(cls, options: dict, vision_dim: int, llm_dim: int) -> "Connector":
        """Build the connector for the given widths from its config options."""

    @abstractmethod
    def num_tokens(self, num_patches: int) -> int:
        """How many visual tokens an image with ``num_patches`` features becomes."""

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(B, K, llm_dim)``."""

    def encode_images(self, vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> visual tokens. The default reads the encoder's patch features; a connector
        that must run inside the encoder (e.g. queries through BEiT3's multiway layers) overrides
        this and sets ``reads_features = False``."""
        return self(vision(pixel_values))
