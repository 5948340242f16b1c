"""CLIP ViT through open_clip (any ``open_clip`` model name + pretrained tag or local file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import open_clip
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from open_clip.timm_model import TimmModel

from vlm.config import VisionConfig
from vlm.core.errors import ConfigError
from vlm.modeling.vision.base import VisionEncoder, layer_count, timm_mean_std
from vlm.modeling.vision.timm_vit import prune_timm_vit, timm_vit_features


@dataclass
class OpenCLIPOptions:
    """``model_name``: an open_clip architecture ('ViT-L-14-336', ...) used with ``pretrained``
    (a tag like 'openai' or a local checkpoint file); ``quick_gelu`` for OpenAI weights.
    ``preprocess_tag``: a pretrained tag of ``model_name`` whose mean / std to use, for a local
    ``pretrained`` file (open_clip gives a file OpenAI CLIP's; SigLIP's tag is 'webli')."""

    model_name: Optional[str] = None
    quick_gelu: bool = False
    preprocess_tag: Optional[str] = None


class OpenCLIPVisionEncoder(VisionEncoder):
    """open_clip ``VisionTransformer``, or the timm ViT trunk of an open_clip ``TimmModel`` tower
    (the SigLIP models); blocks after the feature layer are pruned at load.

    Mean / std: the model's ``preprocess_cfg`` (set by ``open_clip.create_model``), else a timm
    trunk's ``pretrained_cfg``, else OpenAI CLIP's.
    """

    Options = OpenCLIPOptions

    def __init__(self, cfg: VisionConfig, visual: torch.nn.Module):
        super().__init__(cfg)
        if isinstance(visual, TimmModel):
            self._init_timm_tower(cfg, visual)
            return
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

    def _init_timm_tower(self, cfg: VisionConfig, visual: TimmModel) -> None:
        """The encoder around a ``TimmModel`` tower: its trunk pruned as ``timm_vit`` prunes, and
        its pooling / projection head (the image embedding's only) removed."""
        trunk = visual.trunk
        prune_timm_vit(trunk, cfg.feature_layer, "open_clip")
        visual.head = torch.nn.Sequential()
        self.visual = visual
        self.embed_dim = trunk.embed_dim
        self.image_size = trunk.patch_embed.img_size[0]
        grid = trunk.patch_embed.grid_size
        self.num_patches = grid[0] * grid[1] + (trunk.num_prefix_tokens if cfg.keep_cls else 0)
        mean, std = timm_mean_std(trunk, self.mean, self.std)
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(preprocess.get("mean", mean))
        self.std = tuple(preprocess.get("std", std))

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "OpenCLIPVisionEncoder":
        opts = OpenCLIPOptions(**dict(cfg.options))
        if cfg.pretrained or opts.model_name:
            if not opts.model_name:
                raise ConfigError("open_clip encoder: options.model_name is required with pretrained")
            model = open_clip.create_model(
                opts.model_name, pretrained=cfg.pretrained, force_quick_gelu=opts.quick_gelu,
                force_preprocess_cfg=tag_mean_std(opts.model_name, opts.preprocess_tag)
            )
            return cls(cfg, model.visual)
        # embed_dim only sizes the (pruned) projection head
        visual = _build_vision_tower(embed_dim=1, vision_cfg=CLIPVisionCfg(**dict(cfg.arch)),
                                     quick_gelu=opts.quick_gelu)
        if isinstance(visual, TimmModel) and "image_size" in cfg.arch:
            # timm builds the named model's input size; open_clip's factory resizes it the same way
            visual.set_input_size(cfg.arch["image_size"])
        return cls(cfg, visual)

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """``arch`` holds ``CLIPVisionCfg`` fields, and ``options.preprocess_tag`` is a tag of
        ``options.model_name``."""
        super().check(cfg, where)
        opts = OpenCLIPOptions(**dict(cfg.options))
        tag_mean_std(opts.model_name, opts.preprocess_tag, where)

    @classmethod
    def arch_keys(cls) -> set:
        return set(CLIPVisionCfg.__dataclass_fields__)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if isinstance(self.visual, TimmModel):
            return timm_vit_features(self.visual.trunk, pixel_values, self.cfg.keep_cls)
        dtype = self.visual.conv1.weight.dtype
        x = self.visual._embeds(pixel_values.to(dtype))
        x = self.visual.transformer(x)
        return x if self.cfg.keep_cls else x[:, 1:]


def tag_mean_std(model_name: Optional[str], tag: Optional[str], where: str = "model.vision") -> dict:
    """``{"mean", "std"}`` of open_clip's pretrained tag ``tag`` of ``model_name`` (``{}`` for no
    tag); a ConfigError at ``where.options.preprocess_tag`` for a tag ``model_name`` does not have."""
    if tag is None:
        return {}
    if not model_name:
        raise ConfigError(f"{where}.options.preprocess_tag: needs options.model_name (the model the tag is of)")
    pretrained_cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not pretrained_cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ConfigError(f"{where}.options.preprocess_tag: '{tag}' is not a pretrained tag of open_clip model "
                          f"'{model_name}' (its tags: {tags})")
    return {"mean": tuple(pretrained_cfg["mean"]), "std": tuple(pretrained_cfg["std"])}
