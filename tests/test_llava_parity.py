"""Parity with transformers' LlavaForConditionalGeneration: same weights, same numbers.

The reference is built from a tiny ``LlavaConfig`` (CLIP vision tower, Llama text model,
``vision_feature_layer=-2``, default select strategy that drops CLS) and its weights are mapped
into our hf_clip encoder, ``mlp2x_gelu`` connector and a ``LlamaForCausalLM``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from vlm.config import VisionConfig
from vlm.modeling.connectors.mlp import MLPProjector
from vlm.modeling.vision.hf_clip import HFCLIPVisionEncoder
from vlm.modeling.vlm import VisionLanguageModel

IMAGE_TOKEN_ID = 99
PAD, BOS, EOS = 0, 1, 2
K = 16  # (32 / 8) ** 2 patches, CLS dropped


def clip_config(layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=4, image_size=32, patch_size=8)


def llama_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def pair():
    """(reference Llava, our VisionLanguageModel) holding the same weights, both in eval mode."""
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=clip_config(), text_config=llama_config(), image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    ref = LlavaForConditionalGeneration(config).eval()
    state = ref.state_dict()

    vision = CLIPVisionModel(clip_config())
    vision.load_state_dict(strip_prefix(state, "model.vision_tower."))
    llm = LlamaForCausalLM(llama_config())
    llm_state = {"model." + k: v for k, v in strip_prefix(state, "model.language_model.").items()}
    llm_state["lm_head.weight"] = state["lm_head.weight"]
    llm.load_state_dict(llm_state)
    projector = strip_prefix(state, "model.multi_modal_projector.")
    connector = MLPProjector(32, 48)
    connector.load_state_dict({"proj.0.weight": projector["linear_1.weight"], "proj.0.bias": projector["linear_1.bias"],
                               "proj.2.weight": projector["linear_2.weight"], "proj.2.bias": projector["linear_2.bias"]})
    encoder = HFCLIPVisionEncoder(VisionConfig(name="hf_clip", feature_layer=-2), vision)
    ours = VisionLanguageModel(encoder, connector, llm, IMAGE_TOKEN_ID).eval()
    assert ours.num_image_tokens == K
    return ref, ours


def padded_batch(padding_side: str):
    """Two prompts of different lengths, each with one image, padded on ``padding_side``."""
    rows = [
        [BOS, 5, 6] + [IMAGE_TOKEN_ID] * K + [7, 8, 9, 10, 11, 12],
        [BOS] + [IMAGE_TOKEN_ID] * K + [20, 21],
    ]
    longest = max(map(len, rows))
    ids = torch.full((2, longest), PAD)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    return ids, mask, pixels


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_llava_for_padded_batch_with_images(pair, padding_side):
    ref, ours = pair
    ids, mask, pixels = padded_batch(padding_side)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = ours(ids, attention_mask=mask, pixel_values=pixels).logits
    assert got.shape == expected.shape == (2, ids.shape[1], 100)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_loss_matches_llava_when_labels_are_given(pair):
    ref, ours = pair
    ids, mask, pixels = padded_batch("right")
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[ids == IMAGE_TOKEN_ID] = -100
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        got = ours(ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_greedy_generation_matches_llava_token_for_token(pair):
    ref, ours = pair
    ids, mask, pixels = padded_batch("left")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    got = ours.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert got.shape == (2, 8)
    assert torch.equal(got, expected[:, ids.shape[1]:])


# ---------------------------------------------------------------------------------------------
# the hf_clip encoder alone


@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("feature_layer,kept_layers", [(-2, 3), (-1, 4), (1, 1), (0, 0)])
def test_hf_clip_encoder_drops_unused_layers_and_matches_hidden_state(feature_layer, kept_layers, keep_cls):
    torch.manual_seed(0)
    reference = CLIPVisionModel(clip_config(layers=4)).eval()
    encoder = HFCLIPVisionEncoder(VisionConfig(name="hf_clip", feature_layer=feature_layer, keep_cls=keep_cls),
                                  copy.deepcopy(reference)).eval()
    assert len(encoder.model.encoder.layers) == kept_layers
    assert len(reference.encoder.layers) == 4
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
        got = encoder(pixels)
    expected = hidden if keep_cls else hidden[:, 1:]
    assert got.shape == (2, 16 + keep_cls, 32) == (2, encoder.num_patches, encoder.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_hf_clip_encoder_rejects_feature_layer_beyond_depth():
    from vlm.config import ConfigError

    with pytest.raises(ConfigError, match="feature_layer=5"):
        HFCLIPVisionEncoder(VisionConfig(name="hf_clip", feature_layer=5), CLIPVisionModel(clip_config(layers=4)))
