"""BEiT3 through torchscale: the vision path as an encoder, image + queries for ``beit3_query``.

BEiT3 through torchscale's ``BEiT3``: the vision path as an encoder, and image + queries
through the multiway experts for the ``beit3_query`` connector.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from vlm.config import VisionConfig
from vlm.modeling.vision.base import VisionEncoder, layer_count
from vlm.modeling.vision.beit3_weights import load_unilm_checkpoint


class BEiT3Size(str, enum.Enum):
    """The unilm BEiT3 presets."""

    base = "base"
    large = "large"


# unilm beit3 modeling_utils: _get_base_config / _get_large_config (mlp_ratio 4, vocab 64010)
COMMON_ARGS = dict(img_size=224, patch_size=16, vocab_size=64010, multiway=True, layernorm_embedding=False,
                   normalize_output=True, no_output_layer=True, drop_path_rate=0.0)
SIZE_ARGS = {
    BEiT3Size.base: dict(encoder_embed_dim=768, encoder_attention_heads=12, encoder_ffn_embed_dim=3072,
                         encoder_layers=12),
    BEiT3Size.large: dict(encoder_embed_dim=1024, encoder_attention_heads=16, encoder_ffn_embed_dim=4096,
                          encoder_layers=24),
}


def torchscale_classes():
    """torchscale's ``(EncoderConfig, BEiT3)``, imported on first use so that the rest of ``vlm``
    works without it; ImportError says how to install it."""
    try:
        with warnings.catch_warnings():  # torchscale 0.3 imports timm's old module path (timm 1.x warns)
            warnings.filterwarnings("ignore", "Importing from timm.models.layers", FutureWarning)
            from torchscale.architecture.config import EncoderConfig
            from torchscale.model.BEiT3 import BEiT3
    except ImportError as exc:
        raise ImportError("the 'beit3' encoder needs torchscale: pip install fairscale && "
                          "pip install --no-deps torchscale==0.3.0 (see the Makefile)") from exc
    return EncoderConfig, BEiT3


@dataclass
class BEiT3Options:
    """``size``: the unilm preset that ``model.vision.arch`` (torchscale ``EncoderConfig``
    fields, e.g. ``img_size``) overrides. ``final_norm``: apply BEiT3's final multiway
    LayerNorm to the selected hidden state (image tokens and queries alike)."""

    size: BEiT3Size = BEiT3Size.base
    final_norm: bool = False


def encoder_args(cfg: VisionConfig):
    """torchscale's ``EncoderConfig``: the preset of ``options.size``, then ``arch``."""
    size = BEiT3Size(BEiT3Options(**dict(cfg.options)).size)
    encoder_config, _ = torchscale_classes()
    return encoder_config(**{**COMMON_ARGS, **SIZE_ARGS[size], **dict(cfg.arch)})


def init_like_unilm(model: nn.Module) -> None:
    """unilm's ``BEiT3Wrapper._init_weights``: Linear ~ trunc normal (std 0.02), zero bias;
    LayerNorm weight 1, bias 0. Embeddings keep torchscale's own init."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BEiT3VisionEncoder(VisionEncoder):
    """torchscale ``BEiT3``: image tokens through the vision expert (multiway branch ``A``).

    Blocks after the feature layer are dropped at load; the final LayerNorm is kept only with
    ``options.final_norm``. The language expert (branch ``B``) and the text embeddings are kept
    for :meth:`forward_with_queries`. Preprocessing defaults to a bicubic square resize with
    0.5 / 0.5 normalisation, as unilm's.
    """

    Options = BEiT3Options
    default_preprocess = "resize"
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, cfg: VisionConfig, model: nn.Module):
        super().__init__(cfg)
        opts = BEiT3Options(**dict(cfg.options))
        keep = layer_count(cfg.feature_layer, len(model.encoder.layers))
        model.encoder.layers = model.encoder.layers[:keep]
        model.encoder.num_layers = keep
        if not opts.final_norm:
            model.encoder.layer_norm = None
        self.beit3 = model
        self.embed_dim = model.args.encoder_embed_dim
        self.image_size = model.args.img_size
        h, w = model.vision_embed.patch_shape
        self.num_patches = h * w + (1 if cfg.keep_cls else 0)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "BEiT3VisionEncoder":
        model = torchscale_classes()[1](encoder_args(cfg))
        init_like_unilm(model)
        if cfg.pretrained:
            load_unilm_checkpoint(model, cfg.pretrained)
        return cls(cfg, model)

    @classmethod
    def arch_keys(cls) -> set:
        return set(vars(torchscale_classes()[0]()))

    @property
    def dtype(self) -> torch.dtype:
        return self.beit3.vision_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.beit3(visual_tokens=pixel_values.to(self.dtype))["encoder_out"]
        return hidden if self.cfg.keep_cls else hidden[:, 1:]

    def forward_with_queries(self, pixel_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Query outputs ``(B, K, D)`` at the feature layer: image tokens (CLS + patches) through
        the vision expert and ``queries`` (``(K, D)`` or ``(B, K, D)``, appended after them)
        through the language expert, with full attention between all of them."""
        image = self.beit3.vision_embed(pixel_values.to(self.dtype))
        queries = queries.to(image.dtype)
        if queries.dim() == 2:
            queries = queries.unsqueeze(0)
        queries = queries.expand(image.shape[0], -1, -1)
        split = image.shape[1]
        out = self.beit3.encoder(src_tokens=None, token_embeddings=torch.cat([image, queries], dim=1),
                                 multiway_split_position=split)
        return out["encoder_out"][:, split:]

    def text_embeddings(self, token_ids) -> torch.Tensor:
        """BEiT3's own text embeddings of ``token_ids`` (rows of ``text_embed``)."""
        return self.beit3.text_embed.weight[torch.as_tensor(token_ids, dtype=torch.long)]
