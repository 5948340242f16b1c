"""VisionLanguageModel: vision encoder -> connector -> visual tokens scattered into a causal LM.

The image-token contract is transformers' Llava one: the processor expands every ``<image>``
into K copies of one placeholder id (K = ``connector.num_tokens(vision.num_patches)``) and the
model replaces those positions' embeddings with the visual tokens, in order. The sequence
length never changes inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import ModelConfig
from vlm.data.feature_cache import feature_cache_refusal
from vlm.data.processor import IGNORE_INDEX
from vlm.modeling.frame_pooling import flatten_with_frames, pooled_tokens

# config fields of causal LMs whose logits are more than ``lm_head(hidden)`` (soft-capping,
# scaling): for those the labelled-only loss falls back to the LLM's own full forward
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ImageTokenMismatch(ValueError):
    """The number of image placeholders and of visual tokens differ."""


@dataclass
class VLMOutput:
    """What a forward pass returns: loss (when labels are given), logits, visual tokens."""

    loss: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    vision_hidden_states: Optional[torch.Tensor] = None
    past_key_values: Any = None


class VisionLanguageModel(nn.Module):
    """A vision encoder, a connector and an HF causal LM joined by image placeholder tokens."""

    # an encoder-decoder LLM (vlm.modeling.seq2seq_vlm.Seq2SeqVisionLanguageModel) says True
    is_encoder_decoder = False

    def __init__(self, vision: nn.Module, connector: nn.Module, llm: nn.Module, image_token_id: int,
                 video_pool: int = 2):
        super().__init__()
        self.vision = vision
        self.connector = connector
        self.llm = llm
        self.image_token_id = image_token_id
        self.tiling = None  # AnyRes: the vlm.data.anyres.TilingSpec the processor tiles images by
        self.video_pool = video_pool  # stride of the bilinear pooling of a video frame's token grid
        self.video_newline = False  # one image_newline after a video's frames (needs tiling's newline)

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer) -> "VisionLanguageModel":
        """Build every component from a model config; the tokenizer must hold the image token.
        :func:`vlm.modeling.build.build_model` picks this class or the encoder-decoder one."""
        from vlm.modeling.connectors import BuildContext, build_connector
        from vlm.modeling.llm import build_llm
        from vlm.modeling.vision import build_vision_encoder

        vision = build_vision_encoder(cfg.vision)
        llm = build_llm(cfg.llm, tokenizer)
        if bool(llm.config.is_encoder_decoder) != cls.is_encoder_decoder:
            raise TypeError(f"{cls.__name__} cannot hold this LLM (is_encoder_decoder="
                            f"{llm.config.is_encoder_decoder}); build it with vlm.modeling.build.build_model")
        ctx = BuildContext(vision_dim=vision.embed_dim, llm_dim=llm.config.get_text_config().hidden_size,
                           tokenizer=tokenizer, vision=vision)
        connector = build_connector(cfg.connector, ctx)
        tiling = None
        if cfg.vision.tiling.enabled:
            from vlm.modeling.tiling import prepare_tiling

            tiling = prepare_tiling(vision, connector, ctx.llm_dim, cfg.vision.tiling)
        model = cls(vision, connector, llm, tokenizer.convert_tokens_to_ids(cfg.image_token), cfg.video.pool)
        model.tiling = tiling
        if cfg.video.newline:
            from vlm.modeling.tiling import check_video_newline

            check_video_newline(tiling is not None and tiling.newline)
            model.video_newline = True
        return model

    @property
    def vision_dtype(self) -> torch.dtype:
        """The dtype the connector expects its input features in."""
        return next(self.connector.parameters(), torch.empty(0)).dtype

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image (K)."""
        return self.connector.num_tokens(self.vision.num_patches)

    @property
    def num_frame_tokens(self) -> Optional[int]:
        """Placeholders per video frame after pooling; None when this model's visual tokens
        form no square grid to pool (it takes no video)."""
        return pooled_tokens(self.num_image_tokens, self.video_pool)

    def encode_images(self, pixel_values: torch.Tensor, instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Images ``(n, 3, S, S)`` -> visual tokens ``(n, K, H_llm)``; ``instructions`` (one per
        image, or None) go to the connector, which may ignore them."""
        return self.connector.encode_images(self.vision, pixel_values, instructions)

    def encode_tiled(self, pixel_values: torch.Tensor, image_layouts: torch.Tensor,
                     instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """AnyRes: every image's tiles ``(tiles, 3, S, S)`` and layout rows ``(n, len(LAYOUT_FIELDS))``
        -> the images' visual tokens, concatenated ``(sum of each image's count, H_llm)``
        (``vlm.modeling.tiling``)."""
        from vlm.data.anyres import TileLayout
        from vlm.modeling.tiling import encode_tiled, row_end_token

        layouts = [TileLayout.from_row(row) for row in image_layouts.tolist()]
        return encode_tiled(self.encode_images, pixel_values, layouts, row_end_token(self.connector, self.tiling),
                            instructions)

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_features: Optional[torch.Tensor] = None, instructions: Optional[Sequence[str]] = None,
              image_layouts: Optional[torch.Tensor] = None, image_repeats: int = 1,
              frame_mask: Optional[torch.Tensor] = None):
        """Token embeddings with visual tokens scattered into the placeholder positions.

        Images come either as ``pixel_values`` or as ``image_features``, the frozen encoder's
        precomputed output ``(n, N, Dv)`` (the feature cache), which skips the encoder.
        ``instructions`` (one text per image, from the processor) reach connectors that read them.
        ``image_layouts`` (AnyRes tiling, one row per image: ``vlm.data.anyres.TileLayout``):
        ``pixel_values`` are every image's tiles and each image gives its own number of tokens.
        ``image_repeats``: the rows hold the images' placeholders that many times over, in blocks
        (preference pairs: chosen rows, then rejected rows); each image is encoded once and its
        visual tokens are scattered into every block.
        ``frame_mask`` (``(n,)`` bool) marks video frames, whose tokens are pooled first
        (:mod:`vlm.modeling.frame_pooling`).
        Returns ``(inputs_embeds, visual_tokens or None)``.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        embeddings = self.llm.get_input_embeddings()
        placeholders = input_ids == self.image_token_id
        inputs_embeds = embeddings(input_ids)
        n_placeholders = int(placeholders.sum())
        images = pixel_values if image_features is None else image_features
        if images is None or images.shape[0] == 0:
            if n_placeholders:
                raise ImageTokenMismatch(f"input has {n_placeholders} image placeholder tokens but no images")
            if self.training and any(p.requires_grad for m in (self.vision, self.connector) for p in m.parameters()):
                # a text-only batch still runs the trainable vision / connector, on one blank image
                # weighted 0: the other ranks may be running them on real images, and DDP waits for
                # every trainable gradient, FSDP for every unit's gather and reduce-scatter
                size = self.vision.image_size
                blank = torch.zeros(1, 3, size, size, device=inputs_embeds.device)  # as the collator gives pixels
                visual = self.encode_images(blank, [""])
                from vlm.modeling.tiling import row_end_token

                newline = row_end_token(self.connector, self.tiling)  # AnyRes: trains with the connector
                visual = visual.sum() + (0.0 if newline is None else newline.sum())
                inputs_embeds = inputs_embeds + 0.0 * visual.to(inputs_embeds.dtype)
            return inputs_embeds, None
        if image_layouts is not None:
            if image_features is not None:
                raise ValueError("AnyRes tiling encodes pixels: cached image_features cannot be tiled")
            visual = self.encode_tiled(pixel_values, image_layouts, instructions)[None]
        elif image_features is not None:
            refusal = feature_cache_refusal(self.connector)  # the connector must read encoder features
            if refusal:
                raise ValueError(refusal)
            visual = self.connector(image_features.to(self.vision_dtype), instructions)
        else:
            visual = self.encode_images(pixel_values, instructions)
        if image_layouts is not None:  # (1, total, H): frames pooled by their layouts already
            tokens = visual.reshape(-1, visual.shape[-1])
        else:
            tokens = flatten_with_frames(visual, frame_mask, self.video_pool)
        if image_repeats != 1:
            tokens = tokens.repeat(image_repeats, 1)
        if n_placeholders != tokens.shape[0]:
            frames = 0 if frame_mask is None else int(frame_mask.sum())
            raise ImageTokenMismatch(
                f"input has {n_placeholders} image placeholder tokens but {visual.shape[0]} image(s) "
                f"({frames} of them video frames) give {tokens.shape[0]} visual tokens; expand each "
                "<image> and <video> with the processor of this model"
            )
        mask = placeholders.unsqueeze(-1).expand_as(inputs_embeds)
        inputs_embeds = inputs_embeds.masked_scatter(mask, tokens.to(inputs_embeds.dtype))
        return inputs_embeds, visual

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        instructions: Optional[Sequence[str]] = None,
        return_logits: bool = True,
        image_layouts: Optional[torch.Tensor] = None,
        image_repeats: int = 1,
        frame_mask: Optional[torch.Tensor] = None,
        **llm_kwargs,
    ) -> VLMOutput:
        """Logits for every position, and the shifted next-token loss when ``labels`` are given
        (positions labelled -100 are ignored).

        With labels and ``return_logits=False`` (what training asks for) the LM head and the
        cross-entropy run on the labelled positions only and ``logits`` is None: the same loss,
        without a vocabulary-wide projection of every prompt, image and padding position.
        ``image_repeats``: see :meth:`embed`.
        """
        inputs_embeds, visual = self.embed(input_ids, pixel_values, image_features, instructions, image_layouts,
                                           image_repeats, frame_mask)
        if labels is not None:
            # a loss needs no KV cache, and with one transformers ignores packed position ids
            llm_kwargs.setdefault("use_cache", False)
        if labels is not None and not return_logits and self._plain_lm_head():
            loss = self._labelled_loss(inputs_embeds, attention_mask, labels, llm_kwargs)
            return VLMOutput(loss, None, visual, None)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        return VLMOutput(out.loss, out.logits, visual, getattr(out, "past_key_values", None))

    def _plain_lm_head(self) -> bool:
        """Whether the LLM's logits are exactly ``output_embeddings(last hidden state)``."""
        config = self.llm.config.get_text_config()
        return not any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS)

    def _labelled_loss(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       labels: torch.Tensor, llm_kwargs: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled positions, with the LM head applied
        to those positions only (transformers' causal LM loss, computed on a gather)."""
        # get_decoder / get_output_embeddings reach through a PEFT wrapper to the base model;
        # LoRA layers live inside those modules, so calling them directly keeps the adapters
        decoder = self.llm.get_decoder()
        head = self.llm.get_output_embeddings()
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **llm_kwargs).last_hidden_state
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = head(hidden[:, :-1][labelled]).float()
        return F.cross_entropy(logits, targets[labelled])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        instructions: Optional[Sequence[str]] = None,
        image_layouts: Optional[torch.Tensor] = None,
        frame_mask: Optional[torch.Tensor] = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """New token ids only, ``(B, T_new)``, by transformers' generation (greedy, beam search or
        sampling, KV cache on by default). Batches must be left-padded."""
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("generate() needs left padding: the last position is padding in some rows")
        inputs_embeds, _ = self.embed(input_ids, pixel_values, instructions=instructions, image_layouts=image_layouts,
                                      frame_mask=frame_mask)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generation_kwargs)
