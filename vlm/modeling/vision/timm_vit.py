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
        prune_timm_vit(model, cfg.feature_layer, "timm_vit")
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
        return timm_vit_features(self.model, pixel_values, self.cfg.keep_cls)


def prune_timm_vit(model: torch.nn.Module, feature_layer: int, encoder: str) -> None:
    """Drop a timm ViT's blocks after ``feature_layer``, its final norm and its head (``encoder``
    names the component in the errors: not a timm ViT, or a layer that is not a block)."""
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
        raise ValueError(f"{encoder} encoder: {type(model).__name__} has no forward_intermediates; "
                         "use a timm Vision Transformer")
    keep = layer_count(feature_layer, len(model.blocks))
    if keep == 0:
        raise ValueError(f"{encoder} encoder: feature_layer must select a transformer block, not the embeddings")
    # a list: an int would mean "the last n blocks" to timm and prune nothing
    model.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)


def timm_vit_features(model: torch.nn.Module, pixel_values: torch.Tensor, keep_cls: bool) -> torch.Tensor:
    """The last block's output of a pruned timm ViT (:func:`prune_timm_vit`) without the final
    norm, ``(B, N, D)``; with ``keep_cls`` its prefix tokens (class, registers) in front."""
    dtype = model.patch_embed.proj.weight.dtype
    out = model.forward_intermediates(
        pixel_values.to(dtype), indices=[len(model.blocks) - 1], return_prefix_tokens=keep_cls,
        norm=False, output_fmt="NLC", intermediates_only=True)[0]
    if keep_cls:
        patches, prefix = out
        return torch.cat([prefix, patches], dim=1)
    return out
