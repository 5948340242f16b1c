"""Parity with transformers' BLIP-2: same weights, same numbers (fp32, within 1e-5).

- ``Blip2QFormerModel`` (tiny config) mapped into our ``QFormer``: query outputs;
- ``Blip2ForImageTextRetrieval`` mapped into our ``QFormer``: ITC and ITM scores (the text path);
- ``Blip2ForConditionalGeneration`` (tiny ViT + Q-Former + OPT) mapped into our
  ``VisionLanguageModel`` (``hf_blip2_vision`` + ``qformer`` + ``OPTForCausalLM``): logits and
  greedy generation.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    OPTConfig,
    OPTForCausalLM,
)

from vlm.config import VisionConfig
from vlm.interop.blip2 import (
    load_blip2_for_conditional_generation,
    load_blip2_for_retrieval,
    qformer_state_from_hf,
)
from vlm.modeling.connectors.image_text import similarity
from vlm.modeling.connectors.qformer import QFormer, QFormerOptions
from vlm.modeling.vision.hf_blip2 import HFBlip2VisionEncoder
from vlm.modeling.vlm import VisionLanguageModel

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
               cross_attention_frequency=2)
NUM_QUERIES = 6
VOCAB = 100
IMAGE_TOKEN_ID = 99
PAD, BOS, EOS = 1, 2, 2


class FakeTokenizer:
    """Just enough of a tokenizer for QFormer's vocabulary bookkeeping (no text is tokenised)."""

    sep_token_id = None
    eos_token_id = EOS
    pad_token_id = PAD
    cls_token_id = None

    def __len__(self):
        return VOCAB


def our_options(**overrides) -> QFormerOptions:
    opts = dict(num_queries=NUM_QUERIES, num_layers=3, hidden_size=32, num_heads=4, intermediate_size=64,
                cross_attention_freq=2, vision_layernorm=False, embed_dim=16)
    opts.update(overrides)
    return QFormerOptions(**opts)


def test_query_outputs_match_blip2_qformer_model():
    torch.manual_seed(0)
    ref = Blip2QFormerModel(Blip2QFormerConfig(encoder_hidden_size=24, **QFORMER)).eval()
    ours = QFormer(24, 16, FakeTokenizer(), our_options()).eval()
    result = ours.load_state_dict(qformer_state_from_hf(ref.state_dict()), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("layers.") and "text_ffn" not in k]
    assert [layer.cross_attn is not None for layer in ours.layers] == [True, False, True]
    images = torch.randn(2, 10, 24)
    with torch.no_grad():
        expected = ref(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=images).last_hidden_state
        got = ours.query_outputs(images)
    assert got.shape == (2, NUM_QUERIES, 32)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the image matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_qformer_state_mapping_rejects_unknown_keys():
    with pytest.raises(ValueError, match="encoder.layer.0.surprise"):
        qformer_state_from_hf({"encoder.layer.0.surprise.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def retrieval_pair():
    torch.manual_seed(0)
    config = Blip2Config(vision_config=VISION, qformer_config=dict(vocab_size=VOCAB, **QFORMER),
                         num_query_tokens=NUM_QUERIES, image_text_hidden_size=16)
    config.qformer_config.use_qformer_text_input = True
    ref = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # transformers initialises the queries to zeros
        ref.query_tokens.normal_(std=0.02)
    ours = QFormer(32, 16, FakeTokenizer(), our_options()).eval()
    load_blip2_for_retrieval(ours, ref)
    return ref, ours


def retrieval_inputs():
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 32, 32, generator=generator)
    ids = torch.randint(5, VOCAB, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = PAD
    return pixels, ids, mask


def test_itc_similarity_matches_blip2_for_image_text_retrieval(retrieval_pair):
    ref, ours = retrieval_pair
    pixels, ids, mask = retrieval_inputs()
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
        features = ref.vision_model(pixel_values=pixels).last_hidden_state
        got = similarity(ours.image_embeddings(features), ours.text_embeddings(ids, mask))
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_itm_logits_match_blip2_for_image_text_retrieval(retrieval_pair):
    ref, ours = retrieval_pair
    pixels, ids, mask = retrieval_inputs()
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                       use_image_text_matching_head=True).logits_per_image
        features = ref.vision_model(pixel_values=pixels).last_hidden_state
        got = ours.match_logits(features, ids, mask)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Blip2ForConditionalGeneration -> VisionLanguageModel


def opt_config() -> OPTConfig:
    return OPTConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=48, pad_token_id=PAD, bos_token_id=BOS,
                     eos_token_id=EOS)


@pytest.fixture(scope="module")
def generation_pair():
    torch.manual_seed(0)
    config = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=opt_config().to_dict(),
                         num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN_ID)
    ref = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        ref.query_tokens.normal_(std=0.02)
    vision = HFBlip2VisionEncoder(VisionConfig(name="hf_blip2_vision", feature_layer=-1, keep_cls=True),
                                  type(ref.vision_model)(Blip2VisionConfig(**VISION)))
    connector = QFormer(32, 48, FakeTokenizer(), our_options())
    ours = VisionLanguageModel(vision, connector, OPTForCausalLM(opt_config()), IMAGE_TOKEN_ID)
    load_blip2_for_conditional_generation(ours, ref)
    return ref, ours.eval()


def prompts(padding_side: str):
    """Two prompts (queries' placeholders first, as BLIP-2's processor writes them), padded."""
    rows = [[IMAGE_TOKEN_ID] * NUM_QUERIES + [BOS, 5, 6, 7, 8, 9], [IMAGE_TOKEN_ID] * NUM_QUERIES + [BOS, 20]]
    longest = max(map(len, rows))
    ids = torch.full((2, longest), PAD)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels


def test_vision_encoder_matches_blip2_vision_model(generation_pair):
    ref, ours = generation_pair
    _, _, pixels = prompts("right")
    with torch.no_grad():
        expected = ref.vision_model(pixel_values=pixels).last_hidden_state
        got = ours.vision(pixels)
    assert got.shape == (2, 17, 32) == (2, ours.vision.num_patches, ours.vision.embed_dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_blip2_for_conditional_generation(generation_pair, padding_side):
    ref, ours = generation_pair
    ids, mask, pixels = prompts(padding_side)
    assert ours.num_image_tokens == NUM_QUERIES
    with torch.no_grad():
        expected = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, pixel_values=pixels).logits
    assert got.shape == expected.shape == (2, ids.shape[1], VOCAB)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches_blip2_token_for_token(generation_pair):
    ref, ours = generation_pair
    ids, mask, pixels = prompts("left")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        expected = ref.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, **kwargs)
    got = ours.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs)
    assert got.shape == (2, 6)
    assert torch.equal(got, expected[:, -6:])


# ---------------------------------------------------------------------------------------------
# InstructBLIP's instruction-aware Q-Former


def test_instruction_aware_query_outputs_match_instructblip_qformer():
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    from vlm.interop.blip2 import load_instructblip_qformer

    torch.manual_seed(0)
    ref = InstructBlipQFormerModel(InstructBlipQFormerConfig(encoder_hidden_size=24, vocab_size=VOCAB,
                                                             **QFORMER)).eval()
    ours = QFormer(24, 16, FakeTokenizer(), our_options(instruction_aware=True)).eval()
    queries = torch.randn(1, NUM_QUERIES, 32) * 0.02
    load_instructblip_qformer(ours, ref, queries)
    images = torch.randn(2, 10, 24)
    ids = torch.randint(5, VOCAB, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.long), mask], 1),
                       query_embeds=queries.expand(2, -1, -1), encoder_hidden_states=images).last_hidden_state
        got = ours.encode(images, ids, mask)
    torch.testing.assert_close(got[:, :NUM_QUERIES], expected[:, :NUM_QUERIES], atol=1e-5, rtol=0)
    other = ids.clone()
    other[:, 1] = 7
    with torch.no_grad():
        changed = ours.encode(images, other, mask)[:, :NUM_QUERIES]
    assert not torch.allclose(changed, got[:, :NUM_QUERIES])  # the instruction steers the queries
