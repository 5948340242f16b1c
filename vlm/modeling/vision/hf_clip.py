"""CLIP ViT through transformers' ``CLIPVisionModel``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlm.config import VisionConfig
from vlm.modeling.vision.base import VisionEncoder, layer_count


class HFCLIPVisionEncoder(VisionEncoder):
    """transformers ``CLIPVisionModel``; blocks after the feature layer are dropped at load."""

    def __init__(self, cfg: VisionConfig, model: CLIPVisionModel):
        super().__init__(cfg)
        config = model.config
        keep = layer_count(cfg.feature_layer, config.num_hidden_layers)
        model.encoder.layers = model.encoder.layers[:keep]
        model.post_layernorm = nn.Identity()  # applies to the pooled CLS only, which we never use
        self.model = model
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        grid = config.image_size // config.patch_size
        self.num_patches = grid * grid + (1 if cfg.keep_cls else 0)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "HFCLIPVisionEncoder":
        if cfg.pretrained:
            model = CLIPVisionModel.from_pretrained(cfg.pretrained)
        else:
            model = CLIPVisionModel(CLIPVisionConfig(**dict(cfg.arch)))
        return cls(cfg, model)

    @classmethod
    def arch_keys(cls) -> set:
        return set(CLIPVisionConfig().to_dict())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        hidden = self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return hidden if self.cfg.keep_cls else hidden[:, 1:]
