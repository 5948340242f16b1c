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
