"""SigLIP 2 ViT through transformers' ``Siglip2VisionModel``, on fixed square images."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from transformers import (
    PretrainedConfig,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from vlm.config import ConfigError
from vlm.modeling.vision.hf_siglip import HFSiglipVisionEncoder


@dataclass
class HFSiglip2Options:
    """``image_size``: the side of the square images (a multiple of ``patch_size``); null: the
    position-embedding grid's side times ``patch_size`` (``sqrt(num_patches) * patch_size``, e.g.
    224 for ``siglip2-base-patch16-224``, 256 for the NaFlex checkpoints), where the learned
    position embeddings are used as they are, not resampled."""

    image_size: Optional[int] = None


class HFSiglip2VisionEncoder(HFSiglipVisionEncoder):
    """transformers ``Siglip2VisionModel`` on square ``image_size`` images; blocks after the
    feature layer are dropped at load.

    SigLIP 2 takes images as patch sequences (NaFlex): ``forward`` cuts the image into patches
    laid out as ``Siglip2ImageProcessor`` does (row-major patches, each flattened as (row, column,
    channel)) and passes a full attention mask and the patch grid as ``spatial_shapes``. The
    aspect-ratio-keeping variable resolution of NaFlex is not used: vlm's preprocessing makes every
    image the same square. Layer semantics, ``keep_cls`` and mean / std are ``hf_siglip``'s.
    """

    Options = HFSiglip2Options
    model_class = Siglip2VisionModel
    config_class = Siglip2VisionConfig
    processor_class = Siglip2ImageProcessor

    def input_size(self, config: PretrainedConfig) -> int:
        """``options.image_size``, else the position-embedding grid's side times the patch size."""
        size = HFSiglip2Options(**dict(self.cfg.options)).image_size
        if size is None:
            return math.isqrt(config.num_patches) * config.patch_size
        if size <= 0 or size % config.patch_size:
            raise ConfigError(f"model.vision.options.image_size: {size} is not a positive multiple of "
                              f"patch_size {config.patch_size}")
        return size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        patch = self.model.config.patch_size
        patches = rearrange(pixel_values.to(dtype), "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)
        batch, length = patches.shape[:2]
        grid = self.image_size // patch
        mask = torch.ones(batch, length, dtype=torch.int32, device=patches.device)
        shapes = torch.tensor([[grid, grid]], device=patches.device).expand(batch, 2)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
