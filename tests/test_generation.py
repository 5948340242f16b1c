"""Generation with a tiny random model and our processor: KV cache, batching, beams, sampling,
padding and image-count checks."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_PATCHES, build_tiny_model, tiny_model_config

from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.modeling.processing import build_processor
from vlm.modeling.vlm import ImageTokenMismatch

QUESTIONS = [
    "<image>\nWhat color is the shape?",
    "Describe the image briefly.\n<image>",
    "<image>\nwhere is it? answer with the corner and the size of the shape in the image",
]


@pytest.fixture
def setup(tokenizer_dir, tokenizer, image_paths):
    cfg = tiny_model_config(tokenizer_dir, template="vicuna_v1")
    model = build_tiny_model(cfg, tokenizer, seed=0)
    processor = build_processor(model, tokenizer, cfg)
    samples = [Sample(id=str(i), turns=[Turn("user", q)], images=[image_paths[i]]) for i, q in enumerate(QUESTIONS)]
    encoded = [processor.encode(s, for_generation=True) for s in samples]
    return model, processor, encoded


def collate(processor, items, padding_side):
    return Collator(processor.tokenizer.pad_token_id, padding_side=padding_side)(items)


def greedy(**extra):
    return dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, **extra)


def test_prompts_have_different_lengths_and_expanded_images(setup):
    model, processor, encoded = setup
    lengths = [len(e.input_ids) for e in encoded]
    assert len(set(lengths)) == 3
    for e in encoded:
        assert e.input_ids.count(processor.image_token_id) == NUM_PATCHES == model.num_image_tokens


def test_greedy_with_and_without_kv_cache_give_identical_tokens(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded, "left")
    args = (batch.input_ids, batch.attention_mask, batch.images)
    cached = model.generate(*args, **greedy(use_cache=True))
    uncached = model.generate(*args, **greedy(use_cache=False))
    assert cached.shape == (3, 10)
    assert torch.equal(cached, uncached)


def test_batched_left_padded_generation_equals_one_by_one(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded, "left")
    assert (batch.attention_mask == 0).any(), "the prompts must actually be padded"
    batched = model.generate(batch.input_ids, batch.attention_mask, batch.images, **greedy())
    for row, item in enumerate(encoded):
        single = collate(processor, [item], "left")
        alone = model.generate(single.input_ids, single.attention_mask, single.images, **greedy())
        assert torch.equal(batched[row], alone[0]), f"prompt {row} differs when batched"


def test_beam_search_returns_requested_shape(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded, "left")
    out = model.generate(batch.input_ids, batch.attention_mask, batch.images,
                         num_beams=3, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (3 * 2, 6)
    assert int(out.min()) >= 0 and int(out.max()) < model.llm.config.vocab_size


def test_sampling_returns_requested_shape_and_is_reproducible_with_a_seed(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded, "left")
    args = (batch.input_ids, batch.attention_mask, batch.images)
    kwargs = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=12, min_new_tokens=12)
    torch.manual_seed(123)
    first = model.generate(*args, **kwargs)
    torch.manual_seed(123)
    second = model.generate(*args, **kwargs)
    assert first.shape == (3, 12)
    assert torch.equal(first, second)
    torch.manual_seed(7)
    other = model.generate(*args, **kwargs)
    assert not torch.equal(first, other), "sampling with a different seed should differ somewhere"


def test_generate_refuses_right_padding(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded, "right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch.input_ids, batch.attention_mask, batch.images, **greedy())


def test_more_images_than_placeholders_raises_image_token_mismatch_with_both_counts(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded[:1], "left")
    two_images = torch.cat([batch.images, batch.images])
    with pytest.raises(ImageTokenMismatch) as info:
        model(batch.input_ids, batch.attention_mask, pixel_values=two_images)
    message = str(info.value)
    assert f"{NUM_PATCHES} image placeholder" in message
    assert f"{2 * NUM_PATCHES} visual tokens" in message and "2 image(s)" in message
    with pytest.raises(ImageTokenMismatch):
        model.generate(batch.input_ids, batch.attention_mask, two_images, **greedy())


def test_placeholders_without_images_raise_image_token_mismatch(setup):
    model, processor, encoded = setup
    batch = collate(processor, encoded[:1], "left")
    with pytest.raises(ImageTokenMismatch, match=f"{NUM_PATCHES} image placeholder tokens but no images"):
        model(batch.input_ids, batch.attention_mask, pixel_values=None)
