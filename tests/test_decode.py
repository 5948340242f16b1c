"""The lean greedy decode gives transformers' greedy tokens: left-padded batches, rows stopping
at different steps, and the eval path that uses it."""

from __future__ import annotations

import torch
from conftest import build_tiny_model, tiny_model_config

from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.inference.decode import greedy_decode
from vlm.inference.generation import generate_answers
from vlm.modeling.processing import build_processor

QUESTIONS = [
    "<image>\nWhat color is the shape?",
    "Describe the image briefly.\n<image>",
    "<image>\nwhere is it? answer with the corner and the size of the shape in the image",
    "what shape is it?",
    "<image>\nwhat shape is it?",
]


def _setup(tokenizer_dir, tokenizer, image_paths):
    cfg = tiny_model_config(tokenizer_dir, template="vicuna_v1")
    model = build_tiny_model(cfg, tokenizer, seed=0)
    processor = build_processor(model, tokenizer, cfg)
    # the last question asks about the second image again (the eval path loads and encodes it once)
    samples = [Sample(str(i), [Turn("user", q)], [image_paths[i % 3]] if "<image>" in q else [])
               for i, q in enumerate(QUESTIONS)]
    left = Collator(tokenizer.pad_token_id, padding_side="left")
    batch = left([processor.encode(s, for_generation=True) for s in samples])
    return model, processor, samples, batch


def test_greedy_decode_equals_transformers_greedy_with_rows_stopping_apart(tokenizer_dir, tokenizer, image_paths):
    model, processor, _, batch = _setup(tokenizer_dir, tokenizer, image_paths)
    assert (batch.attention_mask == 0).any(), "the prompts must be left-padded"
    args = (batch.input_ids, batch.attention_mask, batch.images)
    pad = tokenizer.pad_token_id
    free = model.generate(*args, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=pad)
    # a stop token that some rows produce and others never do, so rows finish apart
    rows = free.tolist()
    stops = [next(t for a in rows for b in rows for t in a if t not in b)]
    expected = model.generate(*args, max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    got = greedy_decode(model, *args, batch.instructions, max_new_tokens=12, eos_token_ids=stops, pad_token_id=pad)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)
    finished = [(row == pad).any().item() for row in got]
    assert any(finished) and got.shape[1] > 3, "some rows must stop early while others go on"
    # and with no stop at all, every row runs to the limit
    got = greedy_decode(model, *args, max_new_tokens=12, eos_token_ids=[], pad_token_id=pad)
    assert torch.equal(got, free)


def test_eval_answers_are_the_same_through_the_lean_decode(tokenizer_dir, tokenizer, image_paths):
    model, processor, samples, _ = _setup(tokenizer_dir, tokenizer, image_paths)
    lean = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=8)
    reference = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=8, lean=False)
    assert lean == reference and any(lean)


def test_the_eval_image_memo_loads_each_image_once_within_its_byte_budget():
    from vlm.inference.generation import _ImageMemo

    loads = []

    def load(path):
        loads.append(path)
        return torch.zeros(1000)  # 4000 bytes

    memo = _ImageMemo(load, max_bytes=8000)
    for path in ["a", "b", "a", "b", "c", "a"]:
        memo.load(path)
    # a and b fit together; c pushes out the least recently used (a), which then loads again
    assert loads == ["a", "b", "c", "a"]
    assert memo.bytes <= 8000


SHARED = [  # several questions about each image, of different lengths: prompts that share a prefix
    ("<image>\nWhat color is the shape?", 0),
    ("<image>\nwhere is it? answer with the corner and the size of the shape in the image", 0),
    ("<image>\nwhat shape is it?", 1),
    ("<image>\nWhat color is the shape?", 1),
    ("<image>\ndescribe the image briefly.", 0),
    ("<image>\nwhat shape is it?", 2),
]


def _shared_setup(tokenizer_dir, tokenizer, image_paths):
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    model = build_tiny_model(cfg, tokenizer, seed=0)
    processor = build_processor(model, tokenizer, cfg)
    samples = [Sample(str(i), [Turn("user", q)], [image_paths[k]]) for i, (q, k) in enumerate(SHARED)]
    return model, processor, samples


def test_decoding_shared_prefixes_once_equals_transformers_greedy(tokenizer_dir, tokenizer, image_paths):
    from vlm.inference.generation import (
        _decode_sharing_prefixes,
        _ImageMemo,
        _shared_prefix_keys,
    )

    model, processor, samples = _shared_setup(tokenizer_dir, tokenizer, image_paths)
    pad = tokenizer.pad_token_id
    prompts = [processor.tokenize(processor.prompt_turns(s.turns), add_generation_prompt=True)[0] for s in samples]
    keys = _shared_prefix_keys(model, samples, prompts)
    assert all(k is not None for k in keys) and len(set(keys)) == 3
    assert len({len(p) - len(k[0]) for p, k in zip(prompts, keys)}) > 1, "suffixes must differ in length"
    left = Collator(tokenizer.pad_token_id, padding_side="left")
    batch = left([processor.encode(s, for_generation=True) for s in samples])
    args = (batch.input_ids, batch.attention_mask, batch.images)
    free = model.generate(*args, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=pad)
    rows = free.tolist()
    stops = [next(t for a in rows for b in rows for t in a if t not in b)]
    expected = model.generate(*args, max_new_tokens=10, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    memo = _ImageMemo(processor.load_image)
    distinct = {path: j for j, path in enumerate(image_paths)}
    pixels = torch.stack([memo.load(path) for path in image_paths])
    got = _decode_sharing_prefixes(model, processor, list(range(len(samples))), keys, prompts, distinct, pixels,
                                   "cpu", dict(max_new_tokens=10, eos_token_ids=stops, pad_token_id=pad))
    assert torch.equal(got, expected)
    assert any((row == pad).any() for row in got) and got.shape[1] > 3, "rows must stop apart"


def test_eval_answers_sharing_prefixes_are_transformers_answers(tokenizer_dir, tokenizer, image_paths, monkeypatch):
    import vlm.inference.generation as generation

    model, processor, samples = _shared_setup(tokenizer_dir, tokenizer, image_paths)
    calls = []
    shared = generation.greedy_decode_shared_prefixes
    monkeypatch.setattr(generation, "greedy_decode_shared_prefixes", lambda *a, **k: calls.append(1) or shared(*a, **k))
    lean = generate_answers(model, processor, samples, batch_size=4, max_new_tokens=8)
    reference = generate_answers(model, processor, samples, batch_size=4, max_new_tokens=8, lean=False)
    assert calls, "the batches share prefixes: the shared-prefix decode must run"
    assert lean == reference and any(lean)
