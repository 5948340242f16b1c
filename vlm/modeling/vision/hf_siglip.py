"""SigLIP ViT through transformers' ``SiglipVisionModel`` (no CLS token: every token is a patch)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from vlm.config import ConfigError, VisionConfig
from vlm.modeling.vision.hf_vision import HFVisionEncoder


def processor_mean_std(processor_class: type, pretrained: Optional[str]) -> Tuple[Sequence[float], Sequence[float]]:
    """``(image_mean, image_std)`` of the image processor saved in the local folder ``pretrained``
    (its ``preprocessor_config.json``), else ``processor_class``'s defaults."""
    if pretrained and (Path(pretrained) / "preprocessor_config.json").is_file():
        processor = processor_class.from_pretrained(pretrained)
        return tuple(processor.image_mean), tuple(processor.image_std)
    return tuple(processor_class.image_mean), tuple(processor_class.image_std)


class HFSiglipVisionEncoder(HFVisionEncoder):
    """transformers ``SiglipVisionModel``; blocks after the feature layer are dropped at load.

    Features are hidden states as transformers' ``output_hidden_states`` gives them: ``feature_layer:
    -1`` is the last encoder layer's output *without* ``post_layernorm``, ``-2`` the penultimate
    layer's. LLaVA-OneVision reads the penultimate layer of SigLIP-so400m (its checkpoints hold 26
    of the 27 layers and select -1): ``feature_layer: -2`` on Google's 27-layer checkpoint, ``-1`` on
    a tower already cut to 26. ``post_layernorm`` and the attention-pooling ``head`` serve the pooled
    image embedding only and are removed. There is no CLS token, so ``keep_cls: true`` is refused.
    Mean / std: the image processor's saved next to ``pretrained``, else SigLIP's 0.5 / 0.5.
    """

    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    processor_class = SiglipImageProcessor
    default_preprocess = "resize"  # SigLIP's processor resizes to the square, aspect ratio not kept

    def __init__(self, cfg: VisionConfig, model: nn.Module):
        refuse_cls(cfg.keep_cls, "model.vision")
        super().__init__(cfg, model)
        model.post_layernorm = nn.Identity()
        model.use_head = False
        if hasattr(model, "head"):
            del model.head
        self.mean, self.std = processor_mean_std(self.processor_class, cfg.pretrained)

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """``keep_cls`` must be false (no CLS token), and ``arch`` must hold config fields only."""
        refuse_cls(cfg.keep_cls, where)
        super().check(cfg, where)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.model.embeddings.patch_embedding.weight.dtype
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state


def refuse_cls(keep_cls: bool, where: str) -> None:
    """A ConfigError at ``where.keep_cls`` when it is true: SigLIP towers have no CLS token."""
    if keep_cls:
        raise ConfigError(f"{where}.keep_cls: SigLIP has no CLS token (every token is a patch); set it to false")
