"""The ``vlm`` command: models, score, data shapes, config errors, and a tiny end-to-end
``vlm run`` followed by ``vlm chat`` on its output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LLM_ARCH, VISION_ARCH, run_vlm

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "llava_shapes.yaml"


def only_json_object(stdout: str) -> dict:
    """The stdout of ``vlm score`` must be exactly one JSON object."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


def test_models_json_lists_the_registered_components():
    done = subprocess.run([sys.executable, "-m", "vlm", "models", "--json"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    entries = json.loads(done.stdout)
    assert {"hf_clip", "open_clip", "timm_vit", "beit3"} <= set(entries["vision_encoders"])
    assert {"linear", "mlp2x_gelu", "beit3_query", "qformer"} <= set(entries["connectors"])
    assert "hf_blip2_vision" in entries["vision_encoders"]
    assert {"lm", "caption_bow", "qformer_stage1"} <= set(entries["objectives"])
    assert {"plain", "vicuna_v1", "chatml"} <= set(entries["templates"])
    assert {"llava_json", "coco_captions", "vqav2"} <= set(entries["data_formats"])


def test_models_plain_text_lists_one_kind_per_line(capsys):
    code, out, _ = run_vlm(["models"], capsys)
    assert code == 0
    assert "vision_encoders: " in out and "mlp2x_gelu" in out


@pytest.fixture
def vqa_files(tmp_path):
    questions = {"questions": [
        {"question_id": 1, "image_id": 10, "question": "what color is the shape?"},
        {"question_id": 2, "image_id": 10, "question": "how many shapes are there?"},
        {"question_id": 3, "image_id": 11, "question": "is the shape red?"},
    ]}

    def answers(*texts):
        return [{"answer": t, "answer_id": i + 1, "answer_confidence": "yes"} for i, t in enumerate(texts)]

    annotations = {"annotations": [
        {"question_id": 1, "image_id": 10, "answer_type": "other", "question_type": "what color",
         "multiple_choice_answer": "red", "answers": answers(*["red"] * 8, "dark red", "orange")},
        {"question_id": 2, "image_id": 10, "answer_type": "number", "question_type": "how many",
         "multiple_choice_answer": "2", "answers": answers(*["2"] * 5, *["two"] * 3, "3", "1")},
        {"question_id": 3, "image_id": 11, "answer_type": "yes/no", "question_type": "is the",
         "multiple_choice_answer": "yes", "answers": answers(*["yes"] * 10)},
    ]}
    results = [{"question_id": 1, "answer": "Red."}, {"question_id": 2, "answer": "two"},
               {"question_id": 3, "answer": "no"}]
    paths = {}
    for name, obj in (("questions", questions), ("annotations", annotations), ("results", results)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    return paths


def test_score_vqa_prints_what_score_vqa_returns(vqa_files, capsys):
    from vlm.evaluation.vqa_metric import score_vqa

    code, out, err = run_vlm(["score", "vqa", "--questions", vqa_files["questions"],
                               "--annotations", vqa_files["annotations"],
                               "--results", vqa_files["results"], "--details"], capsys)
    assert code == 0, err
    printed = only_json_object(out)
    expected = score_vqa(str(vqa_files["questions"]), str(vqa_files["annotations"]), str(vqa_files["results"]))
    assert printed == json.loads(json.dumps(expected))  # JSON turns question ids into strings
    assert 0 < printed["overall"] < 100
    assert set(printed["per_answer_type"]) == {"other", "number", "yes/no"}


def test_score_vqa_prints_a_summary_by_default_and_the_detail_into_a_file(vqa_files, tmp_path, capsys):
    details = tmp_path / "details.json"
    code, out, err = run_vlm(["score", "vqa", "--questions", vqa_files["questions"],
                               "--annotations", vqa_files["annotations"], "--results", vqa_files["results"],
                               "--details-out", details], capsys)
    assert code == 0, err
    summary, full = only_json_object(out), json.loads(details.read_text())
    assert "per_question" not in summary and summary["questions"] == len(full["per_question"]) > 0
    assert summary["overall"] == full["overall"]
    assert summary["per_answer_type"] == full["per_answer_type"]


def test_score_vqa_without_questions_is_a_usage_error(vqa_files, capsys):
    code, _, err = run_vlm(["score", "vqa", "--annotations", vqa_files["annotations"],
                             "--results", vqa_files["results"]], capsys)
    assert code == 2
    assert "--questions" in err


def test_score_caption_prints_what_score_captions_returns(tmp_path, capsys, monkeypatch):
    # pycocoevalcap starts Java for METEOR, so the scorer is called once: through the CLI, with a
    # spy that records what the real function returned for the files the CLI was given.
    import vlm.evaluation.caption_metric as caption_metric

    annotations = {
        "images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "a small red circle in the center"},
            {"id": 2, "image_id": 1, "caption": "a little red circle in the middle of the image"},
            {"id": 3, "image_id": 2, "caption": "a large blue square at the top left"},
            {"id": 4, "image_id": 2, "caption": "a big blue square in the top left corner"},
        ],
    }
    results = [{"image_id": 1, "caption": "a red circle in the center"},
               {"image_id": 2, "caption": "a blue square at the top"}]
    ann_path, res_path = tmp_path / "captions.json", tmp_path / "results.json"
    ann_path.write_text(json.dumps(annotations))
    res_path.write_text(json.dumps(results))

    real, calls = caption_metric.score_captions, []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        scores = real(*args, **kwargs)
        calls[-1] += (scores,)
        return scores

    monkeypatch.setattr(caption_metric, "score_captions", spy)
    code, out, err = run_vlm(["score", "caption", "--annotations", ann_path, "--results", res_path], capsys)
    assert code == 0, err
    printed = only_json_object(out)
    assert len(calls) == 1
    (args, kwargs, expected) = calls[0]
    assert [str(a) for a in args] == [str(ann_path), str(res_path)]
    assert kwargs == {"spice": False}
    assert printed == json.loads(json.dumps(expected))
    assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(printed)
    assert all(math.isfinite(v) for v in printed.values())
    assert 0 < printed["Bleu_1"] <= 1 and printed["CIDEr"] > 0


def test_data_shapes_writes_the_dataset(tmp_path, capsys):
    out_dir = tmp_path / "shapes"
    code, out, err = run_vlm(["data", "shapes", "--out", out_dir, "--num-train", "4", "--num-test", "2",
                               "--image-size", "32"], capsys)
    assert code == 0, err
    paths = json.loads(out)
    for split, n_images in (("train", 4), ("test", 2)):
        for kind in ("captions", "questions", "annotations", "conversations", "text"):
            assert Path(paths[split][kind]).is_file(), (split, kind)
        images = sorted(Path(paths[split]["image_root"]).glob("*.png"))
        assert len(images) == n_images
    captions = json.loads((out_dir / "captions_train.json").read_text())
    assert len(captions["images"]) == 4


def test_config_error_exits_2_with_the_key_and_a_suggestion_before_building_anything(tmp_path, capsys,
                                                                                     monkeypatch):
    import vlm.app.recipes
    import vlm.app.stages
    import vlm.data.synthetic
    import vlm.modeling.vlm

    def forbidden(*args, **kwargs):
        raise AssertionError("something was built before the config was validated")

    monkeypatch.setattr(vlm.modeling.vlm.VisionLanguageModel, "from_config", classmethod(forbidden))
    monkeypatch.setattr(vlm.app.stages, "run_stage", forbidden)
    monkeypatch.setattr(vlm.app.recipes, "run_recipe", forbidden)
    monkeypatch.setattr(vlm.data.synthetic, "generate_shapes", forbidden)
    out_dir = tmp_path / "out"
    code, out, err = run_vlm(["train", DEMO, "stages.align.lerning_rate=1", "--out", out_dir], capsys)
    assert code == 2
    assert "stages.align.lerning_rate" in err
    assert "did you mean 'learning_rate'" in err
    assert err.lower().count("did you mean") == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, _, err = run_vlm(["train", tmp_path / "nope.yaml", "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert "nope.yaml" in err


# --- end to end: vlm run, then vlm chat ------------------------------------------------------

def tiny_recipe(out_dir: Path) -> dict:
    """Shapes data (16 / 8 images of 32 px), a tokenizer trained in prepare, a tiny hf_clip +
    llama, an `align` stage then an `instruct` stage with LoRA, caption and VQA evals."""
    data = "${prepare.shapes.out}"
    captions_train = {"format": "coco_captions",
                      "args": {"path": f"{data}/captions_train.json", "image_root": f"{data}/images/train"}}
    return {
        "out_dir": str(out_dir),
        "prepare": {
            "shapes": {"out": "${out_dir}/data", "num_train": 16, "num_test": 8, "image_size": 32},
            "tokenizer": {"out": "${out_dir}/tokenizer", "vocab_size": 400,
                          "files": [f"{data}/text_train.jsonl", f"{data}/conversations_train.json"]},
        },
        "model": {
            "vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
            "connector": {"name": "mlp2x_gelu"},
            "llm": {"tokenizer": "${prepare.tokenizer.out}", "arch": dict(LLM_ARCH)},
            "template": "chatml",
        },
        "stages": {
            "align": {
                "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                "template": "plain",
                "data": [captions_train],
                "learning_rate": 1e-3, "batch_size": 8, "max_steps": 10, "log_every": 5,
            },
            "instruct": {
                "init_from": "${out_dir}/align/final",
                "train": {"vision": "frozen", "connector": "full", "llm": "lora"},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "template": "chatml",
                "data": [{"format": "llava_json",
                          "args": {"path": f"{data}/conversations_train.json",
                                   "image_root": f"{data}/images/train"}}],
                "learning_rate": 1e-3, "batch_size": 8, "max_steps": 4, "log_every": 2,
            },
        },
        "evals": {
            "caption": {"task": "caption", "max_new_tokens": 6, "batch_size": 8,
                        "data": {"format": "coco_captions",
                                 "args": {"path": f"{data}/captions_test.json",
                                          "image_root": f"{data}/images/test"}}},
            "vqa": {"task": "vqa", "max_new_tokens": 4, "batch_size": 8,
                    "data": {"format": "vqav2",
                             "args": {"questions_path": f"{data}/questions_test.json",
                                      "annotations_path": f"{data}/annotations_test.json",
                                      "image_root": f"{data}/images/test",
                                      "image_pattern": "{image_id:012d}.png"}}},
        },
    }


def test_run_then_chat_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(out_dir), sort_keys=False))

    code, out, err = run_vlm(["run", recipe, "--out", out_dir], capsys)
    assert code == 0, err[-4000:]

    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics["caption"])
    assert "accuracy" in metrics["vqa"]
    assert any(k.startswith("accuracy_") for k in metrics["vqa"])
    for scores in (metrics["caption"], metrics["vqa"]):
        assert all(math.isfinite(v) for v in scores.values())
    assert {"prepare", "stage/align", "stage/instruct", "evaluation", "total"} <= set(metrics["timings_s"])
    for stage in ("align", "instruct"):  # what precision and each speed lever resolved to, and why
        assert metrics["precision"][stage]["requested"] == "auto"
        assert set(metrics["levers"][stage]) == {"compile", "channels_last", "training_attention",
                                                 "frozen_weight_cast", "image_cache", "num_workers"}
        assert all(choice["reason"] for choice in metrics["levers"][stage].values())
    for stage in ("align", "instruct"):
        assert (out_dir / stage / "final" / "manifest.json").is_file()
        assert (out_dir / stage / "metrics.jsonl").is_file()
    assert (out_dir / "instruct" / "final" / "llm_adapter" / "adapter_config.json").is_file()
    assert (out_dir / "eval" / "caption_results.json").is_file()
    assert (out_dir / "eval" / "vqa_results.json").is_file()

    # vlm chat through the installed entry point, against the same answer computed in Python.
    image = sorted((out_dir / "data" / "images" / "test").glob("*.png"))[0]
    checkpoint = out_dir / "instruct" / "final"
    prompt = "what color is the shape?"
    done = subprocess.run([sys.executable, "-m", "vlm", "chat", str(checkpoint), "--image", str(image),
                           "--prompt", prompt, "--max-new-tokens", "6"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]

    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.data.types import Turn
    from vlm.inference.chat import answer
    from vlm.modeling.processing import build_processor

    model, tokenizer, model_cfg = load_pretrained(checkpoint)
    processor = build_processor(model, tokenizer, model_cfg)
    expected = answer(model, processor, str(image), [Turn("user", f"<image>\n{prompt}")], max_new_tokens=6)
    assert done.stdout == expected + "\n"
