"""prepare.tokenizer: training data read by format name with vlm's readers (COCO captions, VQAv2)."""

import json

import yaml

from vlm.app.recipes import run_prepare
from vlm.app.wiring import load_run_config as load_config


def test_a_tokenizer_from_coco_captions_and_vqa_learns_their_words(tmp_path):
    captions = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(3)],
                "annotations": [{"image_id": i % 3, "id": i, "caption": "a zorblat quimble near the flarn"}
                                for i in range(30)]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    questions = {"data_subtype": "val", "questions": [{"question_id": i, "image_id": i, "question": "is the snorkwidget glimmed?"}
                               for i in range(20)]}
    answers = {"annotations": [{"question_id": i, "image_id": i, "multiple_choice_answer": "yes",
                                "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10} for i in range(20)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(answers))
    recipe = {"out_dir": str(tmp_path / "run"),
              "prepare": {"tokenizer": {"out": "${out_dir}/tok", "vocab_size": 400, "data": [
                  {"format": "coco_captions", "args": {"path": str(tmp_path / "captions.json")}},
                  {"format": "vqav2", "args": {"questions_path": str(tmp_path / "q.json"),
                                               "annotations_path": str(tmp_path / "a.json")}}]}},
              "model": {"llm": {"tokenizer": "${prepare.tokenizer.out}", "arch": {"model_type": "llama"}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cfg = load_config(path)
    run_prepare(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tok"))
    for word in (" zorblat", " quimble", " snorkwidget"):  # frequent words become single tokens
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert "<image>" in tok.get_vocab()


def test_tokenizer_data_entries_are_validated_at_load(tmp_path):
    import pytest

    from vlm.config import ConfigError

    recipe = {"prepare": {"tokenizer": {"data": [{"format": "coco_captons", "args": {"path": "x.json"}}]}},
              "model": {"llm": {"arch": {"model_type": "llama"}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"prepare\.tokenizer\.data\.0\.format.*coco_captions"):
        load_config(path)
