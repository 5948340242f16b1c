"""Bad data: files that are not UTF-8, broken JSON, malformed records, image paths outside
image_root, missing files, a wrong image_root, result files that do not match. Each case: exit 2,
one ``error:`` line naming the file and the record / line / field, no stage output written, the
data untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from robust_helpers import Project, error_line, run_vlm, snapshot


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    return Project(tmp_path, shapes_data, tokenizer_dir)


def use_llava(project, records, name="bad.json"):
    path = project.data / name
    path.write_text(json.dumps(records))
    project.stage()["data"] = [{"format": "llava_json",
                                "args": {"path": str(path), "image_root": project.train["image_root"]}}]
    return path


def conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


def train_fails(project, capsys, *needles):
    """Run `vlm train`; assert exit 2, one error line holding every needle, no weights written
    and the data unchanged. Returns the line."""
    recipe = project.write()
    before = snapshot(project.data)
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2, err[-2000:]
    for needle in needles:
        assert needle in line, line
    assert not list(project.out.rglob("*.safetensors"))
    assert snapshot(project.data) == before
    return line


GOOD = {"id": "a", "image": "000001.png", "conversations": conv(("human", "<image>\nwhat?"), ("gpt", "a shape"))}


def test_llava_json_not_utf8_names_file_line_and_byte(project, capsys):
    path = use_llava(project, [GOOD])
    data = path.read_bytes()
    path.write_bytes(data[:20] + b"\xe9" + data[21:])
    train_fails(project, capsys, f"{path}:1", "byte 20", "UTF-8")


def test_jsonl_not_utf8_names_the_line(project, capsys):
    path = project.data / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    project.stage()["data"] = [{"format": "jsonl", "args": {"path": str(path)}}]
    train_fails(project, capsys, f"{path}:2", "byte 30")


def test_jsonl_text_with_an_image_marker_but_no_image_names_the_line(project, capsys):
    path = project.data / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a <image> but no image"}\n')
    project.stage()["data"] = [{"format": "jsonl", "args": {"path": str(path)}}]
    train_fails(project, capsys, f"{path}:2", "1 '<image>' marker(s) but 0 image(s)")


def test_invalid_json_names_the_line(project, capsys):
    path = use_llava(project, [GOOD])
    path.write_text(path.read_text() + "\n]")
    train_fails(project, capsys, f"{path}:2", "invalid JSON")


@pytest.mark.parametrize("record,needles", [
    ({"id": "x", "image": "000001.png"}, ["#1", "missing field 'conversations'"]),
    ({"id": "x", "conversations": conv(("gpt", "hi"), ("human", "yo"))}, ["#1", "conversations[0].from"]),
    ({"id": "x", "conversations": conv(("robot", "hi"), ("gpt", "yo"))}, ["#1", "unknown speaker 'robot'"]),
    ({"id": "x", "image": ["000001.png", "000002.png"], "conversations": conv(("human", "<image> a"), ("gpt", "b"))},
     ["#1", "1 '<image>' marker(s)", "2 image(s)"]),
    ({"id": "x", "image": 7, "conversations": conv(("human", "a"), ("gpt", "b"))}, ["#1", "field 'image'"]),
    ({"id": "x", "conversations": conv(("human", "a"), ("gpt", 3))}, ["#1", "conversations[1].value"]),
], ids=["no_conversations", "roles", "speaker", "markers", "image_type", "value_type"])
def test_malformed_record_names_record_and_field(project, capsys, record, needles):
    path = use_llava(project, [GOOD, record])
    train_fails(project, capsys, str(path), *needles)


@pytest.mark.parametrize("image", ["../../secret.png", "/etc/hostname"], ids=["dotdot", "absolute"])
def test_image_path_outside_image_root_is_refused(project, capsys, image):
    path = use_llava(project, [GOOD, {**GOOD, "image": image}])
    train_fails(project, capsys, f"{path}#1", f"'{image}' is outside image_root", "allow_outside_root")


def test_missing_data_file_names_it(project, capsys):
    project.stage()["data"][0]["args"]["path"] = str(project.data / "nope.json")
    train_fails(project, capsys, "nope.json", "no such file")


def test_data_path_that_is_a_folder_names_it(project, capsys):
    project.stage()["data"][0]["args"]["path"] = str(project.data)
    train_fails(project, capsys, str(project.data))


def test_wrong_image_root_is_caught_before_training(project, capsys):
    # a folder that exists but does not hold the images: the stage's image check, before step 1
    project.stage()["data"][0]["args"]["image_root"] = str(project.data)
    line = train_fails(project, capsys, "stages.align.data", "do not exist", "image_root")
    assert "16 of 16" in line
    assert not (project.out / "align" / "metrics.jsonl").exists()  # failed before step 1
    # a folder that does not exist: the check pass names the key before anything is built
    missing = project.data / "images" / "nope"
    shutil.rmtree(project.out)
    project.stage()["data"][0]["args"]["image_root"] = str(missing)
    train_fails(project, capsys, f"stages.align.data.0.args.image_root: {missing}: no such file or folder")
    assert not project.out.exists()


def test_coco_file_of_another_shape(project, capsys):
    Path(project.train["captions"]).write_text(json.dumps({"images": [{"id": 1}], "anns": []}))
    train_fails(project, capsys, project.train["captions"], "neither an official COCO")


def test_unknown_reader_argument_is_named(project, capsys):
    project.stage()["data"][0]["args"]["imge_root"] = "x"
    recipe = project.write()
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    assert code == 2 and "stages.align.data.0.args.imge_root" in error_line(err)


def vqa_results(project, keep: int) -> Path:
    questions = json.loads(Path(project.test["questions"]).read_text())["questions"]
    path = project.root / "results.json"
    path.write_text(json.dumps([{"question_id": q["question_id"], "answer": "red"} for q in questions[:keep]]))
    return path


def test_score_vqa_with_missing_results_suggests_the_flag_the_cli_has(project, capsys):
    results = vqa_results(project, keep=2)
    code, out, err = run_vlm(["score", "vqa", "--questions", project.test["questions"], "--annotations",
                              project.test["annotations"], "--results", results], capsys)
    line = error_line(err)
    assert code == 2 and "--allow-missing" in line and "results.json" in line and out == ""


def test_score_vqa_allow_missing_scores_the_answered_subset(project, capsys):
    results = vqa_results(project, keep=2)
    code, out, err = run_vlm(["score", "vqa", "--questions", project.test["questions"], "--annotations",
                              project.test["annotations"], "--results", results, "--allow-missing"], capsys)
    assert code == 0, err
    assert 0.0 <= json.loads(out)["overall"] <= 100.0


def test_score_caption_result_for_an_unknown_image(project, capsys):
    results = project.root / "caps.json"
    results.write_text(json.dumps([{"image_id": 424242, "caption": "a shape"}]))
    code, _, err = run_vlm(["score", "caption", "--annotations", project.test["captions"], "--results", results],
                           capsys)
    line = error_line(err)
    assert code == 2 and "424242" in line and "caps.json" in line


def test_score_results_not_utf8(project, capsys):
    results = project.root / "caps.json"
    results.write_bytes(b'[{"image_id": 1, "caption": "\xff"}]')
    code, _, err = run_vlm(["score", "caption", "--annotations", project.test["captions"], "--results", results],
                           capsys)
    line = error_line(err)
    assert code == 2 and "caps.json" in line and "byte 29" in line
