"""Encoder-decoder LLMs (``model.llm.kind: seq2seq``) through a stage: the prefix-LM split, the
objective's loss falling, LoRA on the T5, and the saved stage output reloaded with the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_config, tiny_model_config

from vlm.app.stages import run_stage
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import ConfigError
from vlm.data.processor import IGNORE_INDEX
from vlm.data.types import Sample, Turn
from vlm.inference.generation import generate_answers
from vlm.modeling.build import build_model
from vlm.modeling.llm import llm_kind
from vlm.modeling.processing import build_processor
from vlm.modeling.seq2seq_vlm import Seq2SeqVisionLanguageModel, split_prompt_target
from vlm.training.objectives.prefix_lm import (
    PrefixLanguageModeling,
    prefix_split_labels,
)

T5_ARCH = dict(model_type="t5", d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0)


def t5_model_config(tokenizer_dir, kind="seq2seq"):
    return tiny_model_config(tokenizer_dir, **{"llm.arch": dict(T5_ARCH), "llm.kind": kind})


def test_prefix_split_labels_cover_the_suffix_only():
    ids = torch.arange(100, 112).repeat(3, 1)
    labels = torch.full((3, 12), IGNORE_INDEX)
    labels[0, 3:10] = ids[0, 3:10]          # one caption
    labels[1, 1:3] = ids[1, 1:3]            # an earlier answer stays as it is...
    labels[1, 5:11] = ids[1, 5:11]          # ...only the last run is split
    labels[2, 4] = ids[2, 4]                # one token: nothing to split
    seen_cuts = set()
    for seed in range(30):
        split = prefix_split_labels(labels, torch.Generator().manual_seed(seed))
        for row, (start, end) in enumerate([(3, 10), (5, 11)]):
            kept = (split[row] != IGNORE_INDEX).nonzero().flatten().tolist()
            suffix = [k for k in kept if k >= start]
            cut = suffix[0]
            assert start < cut < end and suffix == list(range(cut, end))  # a non-empty prefix and suffix
            assert split[row, cut:end].tolist() == labels[row, cut:end].tolist()
            seen_cuts.add((row, cut))
        assert split[1, 1:3].tolist() == labels[1, 1:3].tolist()
        assert torch.equal(split[2], labels[2])
    assert len({c for r, c in seen_cuts if r == 0}) == 6  # every cut point of a 7-token caption occurs

    # the model reads the prefix in its encoder and is trained on the suffix alone
    split = prefix_split_labels(labels[:1], torch.Generator().manual_seed(0))
    cut = int((split[0] != IGNORE_INDEX).nonzero()[0])
    enc, _, target = split_prompt_target(ids[:1], None, split, eos=2, pad=0)
    assert enc[0].tolist() == ids[0, :cut].tolist() + [2]
    assert target[0].tolist() == ids[0, cut:10].tolist() + [2]


def test_kind_auto_reads_is_encoder_decoder_and_unknown_kinds_are_named(tokenizer_dir, tokenizer):
    assert llm_kind(t5_model_config(tokenizer_dir, kind="auto").llm) == "seq2seq"
    assert llm_kind(tiny_model_config(tokenizer_dir, **{"llm.kind": "auto"}).llm) == "causal"
    with pytest.raises(ConfigError, match="model.llm.kind: unknown kind 'encdec'"):
        llm_kind(t5_model_config(tokenizer_dir, kind="encdec").llm)
    model = build_model(t5_model_config(tokenizer_dir, kind="auto"), tokenizer)
    assert isinstance(model, Seq2SeqVisionLanguageModel)
    assert model.llm.config.decoder_start_token_id == tokenizer.pad_token_id  # T5's convention


def test_prefix_lm_refuses_a_causal_llm(model_config, tokenizer):
    with pytest.raises(ConfigError, match="prefix_lm.*seq2seq"):
        PrefixLanguageModeling(build_model(model_config, tokenizer), tokenizer)


@pytest.mark.slow  # two short stages: about a minute
def test_a_t5_stage_trains_with_prefix_lm_and_lora_and_reloads_with_the_same_tokens(
        tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    captions = {"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}
    common = {"learning_rate": 3e-3, "batch_size": 8, "log_every": 5, "warmup_ratio": 0.0, "precision": "fp32"}
    stages = {
        "align": {"objective": "prefix_lm", "train": {"vision": "frozen", "connector": "full", "llm": "full"},
                  "data": [captions], "max_steps": 30, **common},
        "instruct": {"init_from": str(tmp_path / "run" / "align" / "final"),
                     "train": {"vision": "frozen", "connector": "full", "llm": "lora"},
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": [captions], "max_steps": 5, **common},
    }
    llm = {"tokenizer": str(tokenizer_dir), "arch": dict(T5_ARCH), "kind": "seq2seq"}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"llm": llm})
    run_stage(cfg, "align")
    records = [json.loads(line) for line in (tmp_path / "run" / "align" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    final = run_stage(cfg, "instruct")

    model, tokenizer, model_cfg = load_pretrained(final, device="cpu")
    assert isinstance(model, Seq2SeqVisionLanguageModel)
    manifest = json.loads((final / "manifest.json").read_text())
    assert any("adapter" in entry for entry in manifest["llm"])  # LoRA on the T5, merged in at load
    processor = build_processor(model, tokenizer, model_cfg)
    images = sorted(str(p) for p in Path(shapes_data["test"]["image_root"]).glob("*.png"))[:3]
    samples = [Sample(id=str(i), turns=[Turn("user", "<image>\n")], images=[path]) for i, path in enumerate(images)]
    lean = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=6)
    full = generate_answers(model, processor, samples, batch_size=3, max_new_tokens=6, lean=False)
    assert lean == full and all(isinstance(a, str) for a in lean)


def test_a_recipe_with_an_unknown_llm_kind_is_refused_before_anything_is_built(tmp_path, tokenizer_dir, shapes_data):
    captions = {"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"]}}
    llm = {"tokenizer": str(tokenizer_dir), "arch": dict(T5_ARCH), "kind": "seq2sq"}
    with pytest.raises(ConfigError, match=r"^model\.llm\.kind: unknown kind 'seq2sq' \(did you mean 'seq2seq'\?\)"):
        run_config(tmp_path, tokenizer_dir, {"s": {"data": [captions]}}, model={"llm": llm})
