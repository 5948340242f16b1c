"""What the transformers vision towers (``hf_clip``, ``hf_siglip``, ...) share.

What the transformers vision towers (``hf_clip``, ``hf_siglip``, ``hf_siglip2``,
``hf_blip2_vision``) share: the build from ``cfg.pretrained`` or ``cfg.arch``, and the pruning of
the blocks after the feature layer.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PretrainedConfig, PreTrainedModel

from vlm.config import VisionConfig
from vlm.modeling.vision.base import VisionEncoder, layer_count


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model (``model_class``, configured by ``config_class``) whose
    ``encoder.layers`` after the feature layer are dropped at load; one token per patch, plus
    the CLS token with ``keep_cls``."""

    model_class: ClassVar[type[PreTrainedModel]]
    config_class: ClassVar[type[PretrainedConfig]]

    def __init__(self, cfg: VisionConfig, model: PreTrainedModel):
        super().__init__(cfg)
        config = model.config
        keep = layer_count(cfg.feature_layer, config.num_hidden_layers)
        model.encoder.layers = model.encoder.layers[:keep]
        self.model = model
        self.embed_dim = config.hidden_size
        self.image_size = self.input_size(config)
        grid = self.image_size // config.patch_size
        self.num_patches = grid * grid + (1 if cfg.keep_cls else 0)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "HFVisionEncoder":
        """``model_class.from_pretrained(cfg.pretrained)``, else a new model of ``cfg.arch``."""
        if cfg.pretrained:
            model = cls.model_class.from_pretrained(cfg.pretrained)
        else:
            model = cls.model_class(cls.config_class(**dict(cfg.arch)))
        return cls(cfg, model)

    def input_size(self, config: PretrainedConfig) -> int:
        """The side of the square images the encoder takes: the config's ``image_size``."""
        return config.image_size

    @classmethod
    def arch_keys(cls) -> set:
        return set(cls.config_class().to_dict())
