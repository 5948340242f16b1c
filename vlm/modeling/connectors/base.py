"""The Connector interface: vision features -> visual tokens of the LLM's width."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, List, Optional

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
    # the VisionEncoder class this connector needs (checked by vlm.config.validate); None: any
    requires_vision: ClassVar[Optional[type]] = None
    # True for connectors with their own text path (the Q-Former): ``from_config`` then also gets
    # the LLM's tokenizer as ``tokenizer=``
    takes_tokenizer: ClassVar[bool] = False
    # True (per instance) when the visual tokens depend on each image's instruction text (the
    # instruction-aware Q-Former): the model then calls ``forward(features, instructions)`` /
    # ``encode_images(vision, pixel_values, instructions)`` with one string per image
    reads_instructions: bool = False

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

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        """Raise ConfigError for option values that type checks cannot catch (called by
        ``vlm.config.validate`` with ``where`` = the options' dotted key). The default accepts all."""

    def llm_unused_parameters(self) -> List[nn.Parameter]:
        """Parameters the LLM path (``forward``) never reads, e.g. the Q-Former's text path and
        stage-1 heads. The ``lm`` objective freezes them, so that DDP does not wait for their
        gradients and weight decay does not shrink them. The default: none."""
        return []

    def bind_vision(self, vision: nn.Module) -> None:
        """Called once by ``VisionLanguageModel.from_config`` with the freshly built encoder,
        before any weights are loaded; a connector initialised from the encoder's own weights
        overrides it. The default does nothing."""

    def encode_images(self, vision: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images -> visual tokens. The default reads the encoder's patch features; a connector
        that must run inside the encoder (e.g. queries through BEiT3's multiway layers) overrides
        this and sets ``reads_features = False``."""
        return self(vision(pixel_values))
