"""Training objectives: the caption bag-of-words vision warm-up, and stage checks."""

import json

import pytest
import torch
from conftest import build_tiny_model, run_config

from vlm.app.stages import run_stage
from vlm.config import ConfigError
from vlm.data.types import Turn
from vlm.modeling.processing import build_processor
from vlm.training.objectives.warmup import CaptionBagOfWords


def test_bow_targets_mark_each_trained_token_once_and_no_special_token(model_config, tokenizer):
    model = build_tiny_model(model_config, tokenizer)
    objective = CaptionBagOfWords(model, tokenizer)
    processor = build_processor(model, tokenizer, model_config, "plain")
    turns = [Turn("user", "<image>\nDescribe."), Turn("assistant", "a red circle a red")]
    ids, labels = processor.tokenize(turns)
    hot = objective.targets(torch.tensor([labels]))
    trained = {t for t in labels if t != -100} - set(tokenizer.all_special_ids)
    assert set(torch.nonzero(hot[0]).flatten().tolist()) == trained
    assert hot.sum().item() == len(trained)


def test_bow_warmup_trains_the_encoder_only_and_its_loss_falls(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    stage = {"objective": "caption_bow", "train": {"vision": "full", "connector": "frozen", "llm": "frozen"},
             "data": [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}],
             "learning_rate": 3e-3, "batch_size": 16, "max_steps": 25, "log_every": 5, "warmup_ratio": 0.0}
    cfg = run_config(tmp_path, tokenizer_dir, {"warm": stage})
    final = run_stage(cfg, "warm")
    records = [json.loads(line) for line in (tmp_path / "run" / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_bow" in records[0]
    assert records[-1]["loss_bow"] < 0.7 * records[0]["loss_bow"]
    manifest = json.loads((final / "manifest.json").read_text())
    # the head is not part of the model
    assert [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["vision"]] == [{"weights": "vision.safetensors"}]


def test_bow_refuses_a_stage_that_would_train_the_llm(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    stage = {"objective": "caption_bow", "train": {"vision": "full", "connector": "frozen", "llm": "full"},
             "data": [{"format": "coco_captions", "args": {"path": train["captions"]}}]}
    with pytest.raises(ConfigError, match="caption_bow"):
        run_config(tmp_path, tokenizer_dir, {"warm": stage})


def test_unknown_objective_is_named_with_a_suggestion(tmp_path, tokenizer_dir, shapes_data):
    stage = {"objective": "caption_bw", "data": [{"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"]}}]}
    with pytest.raises(ConfigError, match="did you mean 'caption_bow'"):
        run_config(tmp_path, tokenizer_dir, {"warm": stage})


def test_answer_words_warmup_conditions_on_the_question_and_its_loss_falls(tmp_path, tokenizer_dir, shapes_data):
    train = shapes_data["train"]
    vqa = {"questions_path": train["questions"], "annotations_path": train["annotations"],
           "image_root": train["image_root"], "image_pattern": shapes_data["image_pattern"]}
    stage = {"objective": "answer_words", "train": {"vision": "full", "connector": "frozen", "llm": "frozen"},
             "template": "chatml", "data": [{"format": "vqav2", "args": vqa}],
             "learning_rate": 3e-3, "batch_size": 16, "max_steps": 30, "log_every": 5, "warmup_ratio": 0.0}
    cfg = run_config(tmp_path, tokenizer_dir, {"warm": stage})
    final = run_stage(cfg, "warm")
    records = [json.loads(line) for line in (tmp_path / "run" / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss_answer"] < 0.7 * records[0]["loss_answer"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["vision"]] == [{"weights": "vision.safetensors"}]


def test_answer_words_reads_the_question_apart_from_the_answer(model_config, tokenizer):
    from vlm.training.objectives.warmup import AnswerWords

    model = build_tiny_model(model_config, tokenizer)
    objective = AnswerWords(model, tokenizer)
    processor = build_processor(model, tokenizer, model_config, "chatml")
    row = processor.tokenize([Turn("user", "<image>\nwhat color is it?"), Turn("assistant", "red")])
    ids, labels = torch.tensor([row[0]]), torch.tensor([row[1]])
    answer = objective._bag(labels.clamp(min=0), labels != -100)
    question = objective._bag(ids, labels == -100)
    red = set(tokenizer("red", add_special_tokens=False)["input_ids"])
    assert set(torch.nonzero(answer[0]).flatten().tolist()) == red
    assert not red & set(torch.nonzero(question[0]).flatten().tolist())
    color = set(tokenizer(" color", add_special_tokens=False)["input_ids"])
    assert color <= set(torch.nonzero(question[0]).flatten().tolist())
