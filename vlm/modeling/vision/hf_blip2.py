"""BLIP-2's ViT through transformers' ``Blip2VisionModel`` (EVA ViT-g as BLIP-2 ships it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from vlm.config import VisionConfig
from vlm.modeling.vision.hf_vision import HFVisionEncoder


@dataclass
class HFBlip2VisionOptions:
    """``post_layernorm``: apply the model's ``post_layernorm`` to the selected hidden state.
    In transformers' BLIP-2 checkpoints that LayerNorm is BLIP-2's ``ln_vision`` (the trained
    norm in front of the Q-Former), so keep it on for their weights and set the Q-Former's
    ``vision_layernorm: false``."""

    post_layernorm: bool = True


class HFBlip2VisionEncoder(HFVisionEncoder):
    """transformers ``Blip2VisionModel``; blocks after the feature layer are dropped at load.

    BLIP-2 feeds every token, CLS included, to the Q-Former: use ``keep_cls: true`` and
    ``feature_layer: -1`` (its checkpoints already hold only the blocks BLIP-2 uses).
    """

    Options = HFBlip2VisionOptions
    model_class = Blip2VisionModel
    config_class = Blip2VisionConfig

    def __init__(self, cfg: VisionConfig, model: Blip2VisionModel):
        super().__init__(cfg, model)
        if not HFBlip2VisionOptions(**dict(cfg.options)).post_layernorm:
            model.post_layernorm = nn.Identity()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        hidden = self.model.embeddings(pixel_values.to(dtype))
        for layer in self.model.encoder.layers:
            hidden = layer(hidden)
        hidden = self.model.post_layernorm(hidden)
        return hidden if self.cfg.keep_cls else hidden[:, 1:]
