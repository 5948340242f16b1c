"""``vlm bench train --against hf`` on a tiny model: both sides train the same network (equal
first-batch loss), count real samples and tokens, and report a ratio (no timing asserted)."""

from __future__ import annotations

import pytest
from conftest import run_config
from test_training import conversations

from vlm.app.bench.train import bench_train
from vlm.core.errors import ConfigError


def _stage(shapes, **extra):
    return {"train": {"vision": "frozen", "connector": "full", "llm": "lora"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "template": "chatml", "max_length": 96,
            "data": [conversations(shapes, max_samples=12)], "learning_rate": 1e-3, "batch_size": 4, **extra}


def test_bench_train_compares_the_same_network_on_real_samples(tmp_path, tokenizer_dir, shapes_data):
    packing = True  # the first-batch check is on the padded batch; the timed vlm side packs
    cfg = run_config(tmp_path, tokenizer_dir, {"instruct": _stage(shapes_data, packing=packing)})
    result = bench_train(cfg, "instruct", steps=2, warmup=1, precision="fp32")
    assert result["first_batch_loss"]["abs_diff"] < 1e-4
    assert result["packing"] is packing
    for side in ("vlm", "transformers"):
        assert result[side]["steps"] == 2 and result[side]["samples"] == 8
        assert result[side]["samples_per_s"] > 0 and result[side]["tokens_per_s"] > 0
    assert result["ratio_samples_per_s"] > 0 and result["env"]["cpu"]["capability"]
    assert result["precision"]["precision"] in ("fp32", "bf16")


def test_bench_train_refuses_an_objective_transformers_does_not_have(tmp_path, tokenizer_dir, shapes_data):
    stage = _stage(shapes_data, objective="caption_bow")
    stage["train"] = {"vision": "full", "connector": "frozen", "llm": "frozen"}
    cfg = run_config(tmp_path, tokenizer_dir, {"s": stage})
    with pytest.raises(ConfigError, match="objective"):
        bench_train(cfg, "s", steps=1, warmup=1)
