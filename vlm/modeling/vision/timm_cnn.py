"""Any timm convolutional network by name: one stage's feature map as the patch tokens.

Any timm convolutional network by name (``timm.create_model(..., features_only=True)``): one
stage's feature map, read row by row as the patch tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from omegaconf import MISSING

from vlm.config import VisionConfig
from vlm.core.errors import ConfigError
from vlm.modeling.vision.base import (
    VisionEncoder,
    create_timm_model,
    timm_mean_std,
    timm_options,
)


@dataclass
class TimmCNNOptions:
    """``model_name``: a timm model with ``features_only`` support ('resnet10t', 'convnext_atto',
    ...); ``out_index``: which of its feature stages to read (timm's ``out_indices``; for ResNets
    2 is stride 8, an 8x8 grid at 64 px); ``image_size``: the input side (square)."""

    model_name: str = MISSING
    out_index: int = 2
    image_size: int = 224


class TimmCNNEncoder(VisionEncoder):
    """A timm CNN truncated after feature stage ``out_index``; its ``(C, H, W)`` map becomes
    ``H * W`` tokens of width ``C``. ``model.vision.feature_layer`` does not apply (the stage is
    ``options.out_index``); ``arch`` holds ``timm.create_model`` keyword arguments. Mean and std
    come from the model's ``pretrained_cfg``."""

    Options = TimmCNNOptions
    default_preprocess = "resize"

    def __init__(self, cfg: VisionConfig, model: torch.nn.Module, image_size: int):
        super().__init__(cfg)
        self.model = model
        info = model.feature_info
        self.embed_dim = info.channels()[-1]
        self.image_size = image_size
        with torch.no_grad():  # the exact grid (padding and rounding differ between networks)
            side = model(torch.zeros(1, 3, image_size, image_size))[-1].shape[-1]
        self.num_patches = side * side
        self.mean, self.std = timm_mean_std(model, self.mean, self.std)
        self.channels_last = True

    def use_channels_last(self, enabled: bool) -> None:
        """Channels-last inputs (the default): oneDNN's convolutions run ~1.1x (fp32, AVX2) to
        ~3x (bf16, AMX) faster, and every layer after keeps the layout; the weights stay as
        they are. Off where it was slower (bf16 emulated on a CPU without native bf16)."""
        self.channels_last = bool(enabled)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "TimmCNNEncoder":
        opts = timm_options(TimmCNNOptions, cfg, "timm_cnn", "a timm CNN name")
        kwargs = dict(features_only=True, out_indices=(opts.out_index,), **dict(cfg.arch))
        try:
            model = create_timm_model("timm_cnn", opts.model_name, cfg.pretrained, **kwargs)
        except (RuntimeError, IndexError) as exc:
            raise ConfigError(f"model.vision: timm_cnn cannot build '{opts.model_name}' with feature stage "
                              f"out_index={opts.out_index}: {exc}") from exc
        return cls(cfg, model, opts.image_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        feature_map = self.model(pixel_values)[-1]
        return rearrange(feature_map, "b c h w -> b (h w) c")
