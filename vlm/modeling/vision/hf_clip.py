"""CLIP ViT through transformers' ``CLIPVisionModel``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlm.config import VisionConfig
from vlm.modeling.vision.hf_vision import HFVisionEncoder


class HFCLIPVisionEncoder(HFVisionEncoder):
    """transformers ``CLIPVisionModel``; blocks after the feature layer are dropped at load."""

    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig

    def __init__(self, cfg: VisionConfig, model: CLIPVisionModel):
        super().__init__(cfg, model)
        model.post_layernorm = nn.Identity()  # applies to the pooled CLS only, which we never use

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        hidden = self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state
        return hidden if self.cfg.keep_cls else hidden[:, 1:]
