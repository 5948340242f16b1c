"""scripts/: the data preparation converts tiny stand-ins of the public files into what vlm's
readers read (nothing is downloaded); the launch scripts parse and name configs and stages that exist."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import write_images

from vlm.data.formats import VQA_PROMPT_SUFFIX, read_dataset
from vlm.evaluation.caption_metric import score_captions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepare():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llava_records_with_missing_images_are_dropped_and_extensions_fixed(tmp_path, prepare):
    images = tmp_path / "images"
    write_images(images / "coco" / "train2017", sizes=((32, 32),))
    ocr = write_images(images / "ocr_vqa" / "images", sizes=((32, 32),))
    Path(ocr[0]).rename(Path(ocr[0]).with_suffix(".gif"))  # on disk as .gif, named .jpg in the JSON
    turn = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}]
    records = [
        {"id": "a", "image": "coco/train2017/image_0.png", "conversations": turn},
        {"id": "b", "image": "ocr_vqa/images/image_0.jpg", "conversations": turn},
        {"id": "c", "image": "gqa/images/missing.jpg", "conversations": turn},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    report = prepare.main(["llava-instruct", "--json", str(tmp_path / "mix.json"), "--images", str(images),
                           "--out", str(tmp_path / "out")])
    assert report["kept"] == 3 and report["text_only"] == 1 and report["extension_fixed"] == 1
    assert report["dropped_by_source"] == {"gqa": 1}
    samples = read_dataset("llava_json", path=report["written"], image_root=str(images))
    assert [s.id for s in samples] == ["a", "b", "d"]
    assert samples[1].images[0].endswith("image_0.gif") and Path(samples[1].images[0]).is_file()
    assert (tmp_path / "out" / "report_llava-instruct.json").is_file()


def karpathy_file(tmp_path) -> Path:
    def image(cocoid, split, captions):
        return {"cocoid": cocoid, "split": split, "filepath": "val2014", "filename": f"COCO_{cocoid}.jpg",
                "sentences": [{"sentid": cocoid * 10 + i, "raw": c} for i, c in enumerate(captions)]}
    data = {"images": [image(1, "train", ["a red circle"]), image(2, "restval", ["a blue square", "blue"]),
                       image(3, "val", ["a cross"]), image(4, "test", ["a green triangle", "a triangle"])]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_karpathy_becomes_official_caption_files_per_split(tmp_path, prepare):
    report = prepare.main(["coco-karpathy", "--karpathy", str(karpathy_file(tmp_path)), "--out", str(tmp_path / "o")])
    assert report["train"]["images"] == 2 and report["train"]["captions"] == 3  # restval joins train
    assert report["test"] == {"written": str(tmp_path / "o" / "captions_karpathy_test.json"), "images": 1, "captions": 2}
    samples = read_dataset("coco_captions", path=report["test"]["written"], per="image")
    assert [s.meta["image_id"] for s in samples] == [4]
    assert sorted(samples[0].meta["references"]) == ["a green triangle", "a triangle"]
    exact = score_captions(report["test"]["written"], [{"image_id": 4, "caption": "a green triangle"}])
    assert exact["Bleu_1"] > 0.99  # the file is what the scorer reads


def test_vqav2_becomes_llava_conversations(tmp_path, prepare):
    questions = {"data_subtype": "train2014", "questions": [
        {"question_id": 11, "image_id": 1, "question": "What color?"},
        {"question_id": 12, "image_id": 2, "question": "What shape?"}]}
    annotations = {"annotations": [{"question_id": 11, "image_id": 1, "multiple_choice_answer": "red",
                                    "answers": []}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    report = prepare.main(["vqav2", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                           "--out", str(tmp_path / "o")])
    assert report["kept"] == 1 and report["dropped_unanswered"] == 1
    (sample,) = read_dataset("llava_json", path=report["written"])
    assert sample.turns[0].content == "<image>\nWhat color?" + VQA_PROMPT_SUFFIX
    assert sample.turns[1].content == "red" and sample.images[0].endswith("train2014/COCO_train2014_000000000001.jpg")


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "launch").glob("[!_]*.sh")), ids=lambda p: p.name)
def test_launch_scripts_parse_and_name_existing_configs_and_stages(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    configs = re.findall(r"configs/(?:pretrain|finetune)/[\w.]+\.yaml", text)
    assert configs
    for config in configs:
        stages = yaml.safe_load((ROOT / config).read_text())["stages"]
        for stage in re.findall(r"--stage (\w+)", text):
            assert stage in stages, (config, stage)
    for accelerate_config in re.findall(r"configs/accelerate/[\w.]+\.yaml", text):
        assert (ROOT / accelerate_config).is_file()
