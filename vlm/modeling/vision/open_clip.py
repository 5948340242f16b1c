"""CLIP ViT through open_clip (any ``open_clip`` model name + pretrained tag or local file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower

from vlm.config import VisionConfig
from vlm.core.errors import ConfigError
from vlm.modeling.vision.base import VisionEncoder, layer_count


@dataclass
class OpenCLIPOptions:
    """``model_name``: an open_clip architecture ('ViT-L-14-336', ...) used with ``pretrained``
    (a tag like 'openai' or a local checkpoint file); ``quick_gelu`` for OpenAI weights."""

    model_name: Optional[str] = None
    quick_gelu: bool = False


class OpenCLIPVisionEncoder(VisionEncoder):
    """open_clip ``VisionTransformer``; blocks after the feature layer are pruned at load."""

    Options = OpenCLIPOptions

    def __init__(self, cfg: VisionConfig, visual: torch.nn.Module):
        super().__init__(cfg)
        num_layers = len(visual.transformer.resblocks)
        keep = layer_count(cfg.feature_layer, num_layers)
        if keep == 0:
            raise ValueError("open_clip encoder: feature_layer must select a transformer block")
        # a list: an int would mean "the last n blocks" to open_clip and prune nothing
        visual.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
        self.visual = visual
        self.embed_dim = visual.transformer.width
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        grid = visual.grid_size
        self.num_patches = grid[0] * grid[1] + (1 if cfg.keep_cls else 0)
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(preprocess.get("mean", self.mean))
        self.std = tuple(preprocess.get("std", self.std))

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "OpenCLIPVisionEncoder":
        opts = OpenCLIPOptions(**dict(cfg.options))
        if cfg.pretrained or opts.model_name:
            if not opts.model_name:
                raise ConfigError("open_clip encoder: options.model_name is required with pretrained")
            model = open_clip.create_model(
                opts.model_name, pretrained=cfg.pretrained, force_quick_gelu=opts.quick_gelu
            )
            return cls(cfg, model.visual)
        # embed_dim only sizes the (pruned) projection head
        visual = _build_vision_tower(embed_dim=1, vision_cfg=CLIPVisionCfg(**dict(cfg.arch)),
                                     quick_gelu=opts.quick_gelu)
        return cls(cfg, visual)

    @classmethod
    def arch_keys(cls) -> set:
        return set(CLIPVisionCfg.__dataclass_fields__)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.visual.conv1.weight.dtype
        x = self.visual._embeds(pixel_values.to(dtype))
        x = self.visual.transformer(x)
        return x if self.cfg.keep_cls else x[:, 1:]
