"""Packing: several samples per row give the same loss (and per-sample logits) as padded rows,
labels never cross samples, images stay with their sample, and resume stays exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config
from test_training import assert_same_tensors, conversations, read_metrics, tensors

import vlm.app.stages
from vlm.config import ConfigError
from vlm.data.batch import Collator
from vlm.data.packing import first_fit_decreasing, row_capacity
from vlm.data.processor import IGNORE_INDEX
from vlm.data.types import Sample, Turn
from vlm.modeling.processing import build_processor


def test_first_fit_decreasing_fills_rows_and_keeps_every_index_once():
    bins = first_fit_decreasing([5, 3, 8, 2, 4, 7], capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum([5, 3, 8, 2, 4, 7][i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 29 tokens need at least 3 rows of 10
    with pytest.raises(ValueError, match="11 tokens"):
        first_fit_decreasing([11], capacity=10)


def _items(model, tokenizer, model_config, image_paths):
    processor = build_processor(model, tokenizer, model_config, template="chatml")
    samples = [
        Sample("a", [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "red")], [image_paths[0]]),
        Sample("b", [Turn("user", "describe the image briefly."), Turn("assistant", "a small red circle")], []),
        Sample("c", [Turn("user", "<image>\nwhere is it?"), Turn("assistant", "in the bottom right corner"),
                     Turn("user", "what shape is it?"), Turn("assistant", "a green triangle")], [image_paths[1]]),
        Sample("d", [Turn("user", "<image>\nwhat shape is it?"), Turn("assistant", "a large blue square")], [image_paths[2]]),
    ]
    return [processor.encode(s) for s in samples], processor


def test_packed_loss_equals_the_unpacked_per_token_mean(tiny_model, tokenizer, model_config, image_paths):
    items, processor = _items(tiny_model, tokenizer, model_config, image_paths)
    lengths = [len(it.input_ids) for it in items]
    capacity = row_capacity(lengths, max_length=1000)
    assert capacity == max(lengths) and row_capacity(lengths, max_length=40) == 40
    packed = Collator(tokenizer.pad_token_id, packing=True, max_length=1000)(items)
    order = first_fit_decreasing(lengths, capacity)
    assert packed.input_ids.shape == (len(order), capacity)
    assert len(order) < len(items), f"some row must hold several samples: {lengths}"
    assert packed.num_samples == 4 and packed.attention_mask is None
    padded = Collator(tokenizer.pad_token_id)(items)
    inputs = packed.model_inputs()
    with torch.no_grad():
        expected = tiny_model(**padded.model_inputs())
        got_full = tiny_model(**inputs)
        got = tiny_model(**inputs, return_logits=False)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_full.loss, expected.loss, atol=1e-5, rtol=0)
    # attention is confined to each sample: its logits in the packed row equal its padded row's
    for r, row in enumerate(order):
        start = 0
        for i in row:
            n = lengths[i]
            torch.testing.assert_close(got_full.logits[r, start:start + n], expected.logits[i, :n], atol=1e-5, rtol=1e-5)
            start += n


def test_packed_labels_never_cross_samples(tiny_model, tokenizer, model_config, image_paths):
    items, _ = _items(tiny_model, tokenizer, model_config, image_paths)
    packed = Collator(tokenizer.pad_token_id, packing=True, max_length=10_000)(items)
    starts = (packed.position_ids == 0).nonzero().tolist()
    assert len(starts) >= 4  # one start per sample (and per row's padding)
    for r, s in starts:
        assert packed.labels[r, s] == IGNORE_INDEX
    # images in placeholder order: one per <image>, as many as placeholders / 16
    n_placeholders = int((packed.input_ids == tiny_model.image_token_id).sum())
    assert packed.image_kind == "pixels"
    assert packed.images.shape[0] * tiny_model.num_image_tokens == n_placeholders == 3 * 16


def test_packing_needs_an_objective_that_supports_it(tmp_path, tokenizer_dir, shapes_data):
    stage = {"objective": "caption_bow", "train": {"vision": "full", "connector": "frozen", "llm": "frozen"},
             "data": [conversations(shapes_data)], "packing": True}
    with pytest.raises(ConfigError, match="stages.s.packing"):
        from vlm.app.wiring import validate
        validate(run_config(tmp_path, tokenizer_dir, {"s": stage}))


def packed_stage(shapes):
    return {"train": {"vision": "frozen", "connector": "full", "llm": "full"}, "template": "chatml", "max_length": 96,
            "data": [conversations(shapes, max_samples=12)], "learning_rate": 5e-3, "batch_size": 4,
            "max_steps": 6, "save_every": 2, "log_every": 1, "warmup_ratio": 0.2, "packing": True,
            "group_by_length": True}


def test_resume_with_packing_reproduces_the_run_bitwise(tmp_path, tokenizer_dir, shapes_data):
    cfg_a = run_config(tmp_path, tokenizer_dir, {"instruct": packed_stage(shapes_data)}, out_dir=tmp_path / "A")
    final_a = vlm.app.stages.run_stage(cfg_a, "instruct")
    a = Path(cfg_a.out_dir) / "instruct"
    cfg_b = run_config(tmp_path, tokenizer_dir, {"instruct": packed_stage(shapes_data)}, out_dir=tmp_path / "B")
    b = Path(cfg_b.out_dir) / "instruct"
    shutil.copytree(a / "checkpoints" / "step_0000004", b / "checkpoints" / "step_0000004")
    final_b = vlm.app.stages.run_stage(cfg_b, "instruct", resume=True)
    for rel in ("connector.safetensors", "llm.safetensors"):
        assert_same_tensors(tensors(final_a / rel), tensors(final_b / rel))
    at_4 = tensors(a / "checkpoints" / "step_0000004" / "llm.safetensors")
    assert any(not torch.equal(at_4[k], v) for k, v in tensors(final_a / "llm.safetensors").items())
    original = {r["step"]: r for r in read_metrics(a)}
    resumed = read_metrics(b)
    assert [r["step"] for r in resumed] == [5, 6]
    for r in resumed:
        assert r["loss"] == original[r["step"]]["loss"]
        assert r["samples"] == original[r["step"]]["samples"] == 4
