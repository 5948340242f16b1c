"""The VisionEncoder interface every image backbone implements."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm.config import ConfigError, VisionConfig
from vlm.data.image_transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTransform,
    build_transform,
)


def _plain(node) -> Any:
    """A config node as plain Python values (dicts and lists), anything else unchanged."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@dataclass
class EncoderContext:
    """What a vision encoder is built for besides its options (``VisionEncoder.build``): the
    other fields of the ``model.vision`` section (``VisionConfig``)."""

    name: str = ""
    pretrained: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2
    keep_cls: bool = False
    preprocess: Optional[str] = None

    @classmethod
    def of(cls, vision) -> "EncoderContext":
        """The context of a ``model.vision`` section (a ``VisionConfig`` or its DictConfig)."""
        return cls(name=vision.name, pretrained=vision.pretrained, arch=dict(_plain(vision.arch)),
                   feature_layer=vision.feature_layer, keep_cls=vision.keep_cls, preprocess=vision.preprocess)


class VisionEncoder(nn.Module, ABC):
    """Images ``(B, 3, S, S)`` -> patch features ``(B, N, D)`` from one chosen layer.

    Subclasses set ``embed_dim``, ``image_size``, ``num_patches`` (tokens returned, after the
    CLS policy) and may declare an ``Options`` dataclass for their own config options.
    """

    Options: ClassVar[Optional[type]] = None
    # the preprocessing strategy used when ``cfg.preprocess`` is None
    default_preprocess: ClassVar[str] = "resize_center_crop"
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_dim: int = 0
        self.image_size: int = 0
        self.num_patches: int = 0

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: EncoderContext) -> "VisionEncoder":
        """The component protocol's build (``vlm.core.registry.Component``): :meth:`from_config`
        on the ``VisionConfig`` of ``ctx`` and ``options`` (the encoder keeps it as ``cfg``)."""
        return cls.from_config(VisionConfig(name=ctx.name, pretrained=ctx.pretrained, arch=dict(ctx.arch),
                                            feature_layer=ctx.feature_layer, keep_cls=ctx.keep_cls,
                                            preprocess=ctx.preprocess, options=dict(_plain(options) or {})))

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """The rules of the ``model.vision`` section ``cfg`` (at ``where``) that belong to this
        encoder: :meth:`check_arch` on its ``arch``."""
        cls.check_arch(dict(cfg.arch), f"{where}.arch")

    def use_channels_last(self, enabled: bool) -> None:
        """Whether convolutions run on channels-last inputs (the ``channels_last`` speed lever);
        encoders without convolutions to speed up ignore it."""

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: VisionConfig) -> "VisionEncoder":
        """Load weights from ``cfg.pretrained`` (path or hub id), else build from ``cfg.arch``."""

    @classmethod
    def check_arch(cls, arch: Dict[str, Any], where: str) -> None:
        """Raise ConfigError when ``arch`` has a key the backbone's config does not know."""
        known = cls.arch_keys()
        if known is None:
            return
        from vlm.core.registry import closest

        for key in arch:
            if key not in known:
                raise ConfigError(f"{where}.{key}: unknown architecture field{closest(key, known)}")

    @classmethod
    def arch_keys(cls) -> Optional[set]:
        """Names accepted in ``arch``; None when the backbone validates them itself."""
        return None

    @abstractmethod
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features ``(B, num_patches, embed_dim)``."""

    def image_transform(self, strategy: Optional[str] = None) -> ImageTransform:
        """PIL image -> normalised tensor, by ``strategy`` (default: the config's ``preprocess``,
        else the encoder's ``default_preprocess``)."""
        strategy = strategy or self.cfg.preprocess or self.default_preprocess
        return build_transform(strategy, self.image_size, self.mean, self.std)


def timm_mean_std(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> tuple:
    """``(mean, std)`` from a timm model's ``pretrained_cfg``, else the given ones."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(pretrained_cfg.get("mean", mean)), tuple(pretrained_cfg.get("std", std))


def timm_options(options_type: type, cfg, encoder: str, what: str):
    """``cfg.options`` as ``options_type`` (a timm encoder's options dataclass); a ConfigError
    naming ``encoder`` when ``model_name`` is not set (``what``: the kind of timm model it needs)."""
    from omegaconf import MISSING

    opts = options_type(**dict(cfg.options))
    if opts.model_name == MISSING:
        raise ConfigError(f"{encoder} encoder: options.model_name is required ({what})")
    return opts


def create_timm_model(encoder: str, model_name: str, pretrained: Optional[str], **kwargs) -> nn.Module:
    """``timm.create_model(model_name, **kwargs)``, its weights from the local file ``pretrained``
    when given (timm's own loader: safetensors or ``torch.load(weights_only=True)``, and the model's
    checkpoint filter: OpenAI / open_clip layouts, position-embedding resampling); ``encoder`` names
    the component in the error for a missing file."""
    import timm

    if not pretrained:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"{encoder}: model.vision.pretrained is not a file: {pretrained}")
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)}, **kwargs)


def layer_count(feature_layer: int, num_layers: int) -> int:
    """How many transformer blocks produce hidden state ``feature_layer``.

    Hidden states are indexed as in transformers: 0 is the embedding output, ``i`` the output
    of block ``i``, negative values count from the end (``-1`` = last block).
    """
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ConfigError(
            f"model.vision.feature_layer={feature_layer} is out of range for {num_layers} layers"
        )
    return index


def pool_patch_grid(features: torch.Tensor, size: int) -> torch.Tensor:
    """Average ``(B, N, D)`` patch features laid out on a square row-major grid down to
    ``(B, size * size, D)`` cells; ValueError when N is not a square of at least ``size**2``."""
    n = features.shape[1]
    grid = math.isqrt(n)
    if grid * grid != n or size > grid:
        raise ValueError(f"pooling to {size}x{size} needs a square patch grid of at least "
                         f"{size}x{size} without CLS; got {n} features")
    image = rearrange(features, "b (h w) d -> b d h w", h=grid, w=grid)
    return rearrange(F.adaptive_avg_pool2d(image, size), "b d h w -> b (h w) d")
