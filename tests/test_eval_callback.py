"""Evaluation during training: named evals every N steps, logged, plotted, best kept, resumable."""

import json

import pytest
import yaml
from conftest import LLM_ARCH, VISION_ARCH

from vlm.app.stages import run_stage
from vlm.app.wiring import load_run_config as load_config
from vlm.config import ConfigError


def _recipe(tmp_path, tokenizer_dir, shapes_data, **stage_extra):
    train, test = shapes_data["train"], shapes_data["test"]
    vqa = {"questions_path": test["questions"], "annotations_path": test["annotations"],
           "image_root": test["image_root"], "image_pattern": shapes_data["image_pattern"]}
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "full"}, "template": "chatml",
             "data": [{"format": "coco_captions", "args": {"path": train["captions"], "image_root": train["image_root"]}}],
             "batch_size": 8, "max_steps": 4, "log_every": 1, "eval_every": 2, "evals": ["vqa_quick"],
             **stage_extra}
    recipe = {"out_dir": str(tmp_path / "run"),
              "model": {"vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
                        "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)}, "template": "chatml"},
              "stages": {"lm": stage},
              "evals": {"vqa_quick": {"task": "vqa", "data": {"format": "vqav2", "args": vqa},
                                      "max_new_tokens": 2, "batch_size": 8, "max_samples_in_training": 5}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _eval_records(tmp_path):
    lines = (tmp_path / "run" / "lm" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.startswith("eval/") for k in r)]


def test_evals_run_every_n_steps_are_logged_plotted_and_the_best_is_kept(tmp_path, tokenizer_dir, shapes_data):
    cfg = load_config(_recipe(tmp_path, tokenizer_dir, shapes_data, keep_best="vqa_quick/accuracy"))
    run_stage(cfg, "lm")
    records = _eval_records(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {k for k in r if not k.startswith("eval/vqa_quick/")} == {"stage", "step", "epoch"}  # as logged
        assert 0.0 <= r["eval/vqa_quick/accuracy"] <= 100.0
    results = json.loads((tmp_path / "run" / "lm" / "eval_during_training" / "vqa_quick_results.json").read_text())
    assert len(results) == 5  # max_samples_in_training caps the eval
    best = json.loads((tmp_path / "run" / "lm" / "best.json").read_text())
    assert best["metric"] == "vqa_quick/accuracy"
    assert best["value"] == max(r["eval/vqa_quick/accuracy"] for r in records)
    assert (tmp_path / "run" / "lm" / "best" / "manifest.json").is_file()
    assert (tmp_path / "run" / "lm" / "loss.png").is_file()


def test_resume_keeps_the_eval_history_up_to_the_checkpoint(tmp_path, tokenizer_dir, shapes_data):
    path = _recipe(tmp_path, tokenizer_dir, shapes_data, save_every=2)
    run_stage(load_config(path), "lm")
    run_stage(load_config(path), "lm", resume=True)  # resumes from step 2: step 4 is evaluated again
    assert [r["step"] for r in _eval_records(tmp_path)] == [2, 4]


def test_stage_evals_must_name_entries_of_evals(tmp_path, tokenizer_dir, shapes_data):
    path = _recipe(tmp_path, tokenizer_dir, shapes_data)
    with pytest.raises(ConfigError, match=r"stages\.lm\.evals: no eval 'vqa_quik'.*vqa_quick"):
        load_config(path, ["stages.lm.evals=[vqa_quik]"])
    with pytest.raises(ConfigError, match=r"stages\.lm\.keep_best"):
        load_config(path, ["stages.lm.keep_best=caption/CIDEr"])
    with pytest.raises(ConfigError, match=r"stages\.lm\.eval_every"):
        load_config(path, ["stages.lm.eval_every=null"])


def test_the_caption_eval_scores_images_with_references_and_counts_the_others(tmp_path, tiny_model, tokenizer,
                                                                             model_config, shapes_data):
    from omegaconf import OmegaConf

    from vlm.config import EvalConfig
    from vlm.evaluation.runner import run_eval
    from vlm.modeling.processing import build_processor

    test = shapes_data["test"]
    data = json.loads(open(test["captions"]).read())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]  # no caption for image 1
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(data))
    cfg = OmegaConf.structured(EvalConfig)
    cfg.task = "caption"
    cfg.data.format = "coco_captions"
    cfg.data.args = {"path": str(path), "image_root": test["image_root"]}
    cfg.max_new_tokens = 3
    processor = build_processor(tiny_model, tokenizer, model_config)
    scores = run_eval(tiny_model, processor, cfg, tmp_path / "eval", "caption")
    assert scores["images_without_references"] == 1
    assert "CIDEr" in scores
