"""The Connector interface: vision features -> visual tokens of the LLM's width."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping, Optional, Sequence

import torch
from torch import nn


@dataclass
class BuildContext:
    """What a connector is built for, handed to ``Connector.build`` / ``from_config``: the
    encoder's feature width, the LLM's hidden width, the LLM's tokenizer and the freshly built
    vision encoder (before any trained weights are loaded)."""

    vision_dim: int
    llm_dim: int
    tokenizer: Any = None
    vision: Optional[nn.Module] = None


class Connector(nn.Module, ABC):
    """Maps ``(B, N, vision_dim)`` features to ``(B, K, llm_dim)`` visual tokens.

    The contract, all a new connector needs:

    - ``from_config(options, ctx)`` builds it from its ``Options`` dataclass values and a
      :class:`BuildContext` (``build(options, ctx)``, the component protocol's entry, calls it);
    - ``num_tokens(N)`` gives K (the processor asks, so nobody guesses the placeholder count);
    - ``forward(features, instructions=None)`` returns the visual tokens; ``instructions`` (one
      text per image) may be ignored.

    Optional: ``check_options`` (value checks at config load, called by ``check``),
    ``requires_vision`` (the encoder class it needs), ``token_grid`` and ``lead_tokens``
    (tiling), ``own_tokenizer`` (a text tokenizer to carry), ``encode_images`` (a connector
    that runs inside the encoder) together with ``feature_cache_conflict``,
    ``llm_unused_parameters`` and ``begin_stage``.
    """

    Options: ClassVar[Optional[type]] = None
    # the VisionEncoder class this connector needs (checked when a config is validated); None: any
    requires_vision: ClassVar[Optional[type]] = None

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: BuildContext) -> "Connector":
        """The component protocol's build (``vlm.core.registry.Component``): :meth:`from_config`
        with the options as a plain dict."""
        return cls.from_config(dict(options or {}), ctx)

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """The rules of the ``model.connector`` section ``cfg`` (at ``where``) that belong to this
        connector: :meth:`check_options` on its options."""
        cls.check_options(dict(cfg.options), f"{where}.options")

    @classmethod
    @abstractmethod
    def from_config(cls, options: dict, ctx: BuildContext) -> "Connector":
        """Build the connector from its config options for the widths (and encoder, tokenizer)
        in ``ctx``."""

    @abstractmethod
    def num_tokens(self, num_patches: int) -> int:
        """How many visual tokens an image with ``num_patches`` features becomes."""

    @abstractmethod
    def forward(self, features: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Visual tokens ``(B, K, llm_dim)``; ``instructions``: one text per image, or None."""

    @classmethod
    def check_options(cls, options: dict, where: str) -> None:
        """Raise ConfigError for option values that type checks cannot catch (called when a
        config is validated, with ``where`` = the options' dotted key). The default accepts all."""

    @classmethod
    def feature_cache_conflict(cls) -> Optional[str]:
        """Why this connector cannot train from the frozen encoder's cached features, or None
        (the default: its visual tokens are a function of the encoder's features). Read only by
        ``vlm.data.feature_cache.feature_cache_refusal``, the one place the feature-cache
        precondition is combined (for the config validation and for the cache alike)."""
        return None

    def token_grid(self, num_patches: int) -> Optional[int]:
        """The side of the square spatial grid an image's visual tokens form, row by row, after
        its :meth:`lead_tokens`, or None (the default: not a grid, e.g. queries). AnyRes tiling
        (``vlm.modeling.tiling``) lays tiles' grids side by side, so it needs one."""
        return None

    def lead_tokens(self, num_patches: int) -> int:
        """How many of an image's visual tokens come before its :meth:`token_grid` and are not
        grid cells (a summary or question token); tiling puts each tile's in front of the
        image's tokens. The default: none."""
        return 0

    def llm_unused_parameters(self) -> List[nn.Parameter]:
        """Parameters the LLM path (``forward``) never reads, e.g. the Q-Former's text path and
        stage-1 heads; the ``lm`` objective freezes them. The default: none."""
        return []

    def begin_stage(self, trains_matching: bool) -> None:
        """Called by ``vlm.training.stages.apply_stage`` before a stage trains, with whether its
        objective trains the connector's image-text heads (``Objective.trains_matching``). The
        default does nothing; the Q-Former keeps its stage-1 weights for retrieval here."""

    def own_tokenizer(self) -> Any:
        """A tokenizer of the connector's own that a stage output must carry beside the LLM's
        (saved as ``connector_tokenizer/``, read back as ``options.text_tokenizer``), or None
        (the default: it reads no text, or the LLM's tokenizer)."""
        return None

    def encode_images(self, vision: nn.Module, pixel_values: torch.Tensor,
                      instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Images -> visual tokens. The default reads the encoder's patch features; a connector
        that must run inside the encoder (e.g. queries through BEiT3's multiway layers) overrides
        this and ``feature_cache_conflict``."""
        return self(vision(pixel_values), instructions)
