"""Any timm Vision Transformer by name (``timm.create_model``), features by ``forward_intermediates``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from timm.models.vision_transformer import VisionTransformer

from vlm.config import VisionConfig
from vlm.modeling.vision.base import (
    VisionEncoder,
    create_timm_model,
    layer_count,
    timm_mean_std,
    timm_options,
)


@dataclass
class TimmViTOptions:
    """``model_name``: a timm model name, optionally with its pretrained tag
    ('vit_large_patch14_clip_336.openai'); the tag chooses the normalisation. ``quick_gelu``:
    build the MLPs with QuickGELU, as OpenAI's CLIP weights need."""

    model_name: str = MISSING
    quick_gelu: bool = False


class TimmViTEncoder(VisionEncoder):
    """A timm ``VisionTransformer``; blocks after the feature layer are pruned at load.

    ``keep_cls`` keeps every prefix token (class and register tokens) in front of the patches.
    Mean and std come from the model's ``pretrained_cfg`` (its tag), CLIP's when it has none.
    """

    Options = TimmViTOptions

    def __init__(self, cfg: VisionConfig, model: torch.nn.Module):
        super().__init__(cfg)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise ValueError(f"timm_vit encoder: {type(model).__name__} has no forward_intermediates; "
                             "use a timm Vision Transformer")
        keep = layer_count(cfg.feature_layer, len(model.blocks))
        if keep == 0:
            raise ValueError("timm_vit encoder: feature_layer must select a transformer block, not the embeddings")
        # a list: an int would mean "the last n blocks" to timm and prune nothing
        model.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
        self.model = model
        self.embed_dim = model.embed_dim
        self.image_size = model.patch_embed.img_size[0]
        grid = model.patch_embed.grid_size
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_patches = grid[0] * grid[1] + (self.num_prefix_tokens if cfg.keep_cls else 0)
        self.mean, self.std = timm_mean_std(model, self.mean, self.std)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "TimmViTEncoder":
        opts = timm_options(TimmViTOptions, cfg, "timm_vit", "a timm model name")
        kwargs = dict(cfg.arch)
        if opts.quick_gelu:
            kwargs["act_layer"] = "quick_gelu"
        model = create_timm_model("timm_vit", opts.model_name, cfg.pretrained, num_classes=0, **kwargs)
        return cls(cfg, model)

    @classmethod
    def arch_keys(cls) -> set:
        return set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.patch_embed.proj.weight.dtype
        out = self.model.forward_intermediates(
            pixel_values.to(dtype), indices=[len(self.model.blocks) - 1], return_prefix_tokens=self.cfg.keep_cls,
            norm=False, output_fmt="NLC", intermediates_only=True)[0]
        if self.cfg.keep_cls:
            patches, prefix = out
            return torch.cat([prefix, patches], dim=1)
        return out
