"""A run folder written by the vlm of before the package restructure (commit 3864d89,
``tests/fixtures/old_run``, made by ``tests/fixtures/make_old_run.py``) still works with this
code: ``vlm chat`` and ``vlm eval`` give the old code's answers from ``instruct/final``,
``vlm export hf-llava`` writes a folder transformers loads and decodes like vlm, and
``vlm train --resume`` continues the old step checkpoint to the old run's final weights.

Each test works in a copy of the fixture (the current directory: every path in its configs is
relative to the fixture folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_vlm
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.types import Turn
from vlm.inference.generation import stop_settings
from vlm.modeling.processing import build_processor

FIXTURE = Path(__file__).parent / "fixtures" / "old_run"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
FINAL = "run/instruct/final"
STEP = "run/instruct/checkpoints/step_0000002"


@pytest.fixture(autouse=True)
def one_thread():
    """The fixture was written on one CPU thread (its reduction order); so is everything here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def old_run(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "old_run"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def test_fixture_is_the_old_codes_run_folder():
    assert EXPECTED["commit"].startswith("3864d89")
    for path in ("run/config.yaml", f"{FINAL}/manifest.json", f"{STEP}/training_state.pt",
                 f"{STEP}/llm_adapter/adapter_model.safetensors", "run/align/final/llm.safetensors"):
        assert (FIXTURE / path).is_file(), path
    # the manifests point into the run folder by relative paths
    manifest = json.loads((FIXTURE / FINAL / "manifest.json").read_text())
    assert manifest["llm"][0]["weights"] == "../../align/final/llm.safetensors"
    assert manifest["llm"][1]["adapter"] == "llm_adapter"


def test_chat_answers_from_the_old_final(old_run, capsys):
    chat = EXPECTED["chat"]
    code, out, err = run_vlm(["chat", chat["checkpoint"], "--image", chat["image"], "--prompt", chat["prompt"],
                              "--max-new-tokens", chat["max_new_tokens"]], capsys)
    assert code == 0, err
    assert out.strip() == chat["reply"] and chat["reply"]


def test_eval_of_the_old_config_on_the_old_final(old_run, capsys):
    ev = EXPECTED["eval"]
    code, out, err = run_vlm(["eval", ev["config"], "--checkpoint", ev["checkpoint"]], capsys)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics.keys() == ev["metrics"].keys()
    for name, scores in ev["metrics"].items():
        assert metrics[name] == pytest.approx(scores, rel=1e-6, abs=1e-12), name
    # the same answers, one by one, as the old code's `vlm run` wrote into run/eval
    for name in ("vqa_results.json", "vqa_per_question.json"):
        assert json.loads((old_run / "run/eval" / name).read_text()) == \
            json.loads((FIXTURE / "run/eval" / name).read_text()), name


def test_export_hf_llava_of_the_old_final(old_run, tmp_path, capsys):
    chat = EXPECTED["chat"]
    hf_dir = tmp_path / "hf"
    code, _, err = run_vlm(["export", "hf-llava", FINAL, "--out", hf_dir], capsys)
    assert code == 0, err
    llava = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat["prompt"]}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(chat["image"]) as img:
        inputs = hf_processor(images=img, text=text, return_tensors="pt")

    model, tokenizer, model_cfg = load_pretrained(FINAL, device="cpu")
    processor = build_processor(model, tokenizer, model_cfg)
    turns = [Turn("user", f"{processor.image_token}\n{chat['prompt']}")]
    ids, _ = processor.tokenize(turns, add_generation_prompt=True)
    assert inputs["input_ids"][0].tolist() == ids  # the same prompt
    n = chat["max_new_tokens"]
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                              processor.load_image(chat["image"])[None], [chat["prompt"]],
                              max_new_tokens=n, do_sample=False, **stop_settings(processor))[0]
        theirs = llava.generate(**inputs, max_new_tokens=n, do_sample=False)[0, len(ids):]
    assert theirs.tolist() == ours.tolist()
    assert hf_processor.decode(theirs, skip_special_tokens=True).strip() == chat["reply"]


def test_resume_from_the_old_step_checkpoint_gives_the_old_final(old_run, capsys):
    shutil.rmtree(old_run / FINAL)
    code, _, err = run_vlm(["train", "run/config.yaml", "--stage", "instruct", "--resume"], capsys)
    assert code == 0, err
    new_final, old_final = old_run / FINAL, FIXTURE / FINAL
    expected_files = EXPECTED["resume"]["weights"]
    assert sorted(str(p.relative_to(new_final)) for p in new_final.rglob("*.safetensors")) == expected_files
    for name in expected_files:
        new, old = load_file(str(new_final / name)), load_file(str(old_final / name))
        assert new.keys() == old.keys(), name
        for key in old:
            # Bit for bit on the machine that wrote the fixture (one thread, same kernels): the
            # resumed steps redo the old run's arithmetic exactly. A CPU with other matmul kernels
            # (another SIMD width) may sum in another order, so the check allows float32 rounding
            # and no more: a wrong data position, learning rate or optimizer state moves these
            # weights by about 1e-4 or more after the two resumed steps.
            torch.testing.assert_close(new[key], old[key], rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")
    # It resumed (training from scratch gives the same final, the run being deterministic): the
    # metrics log keeps the old run's records up to step 2 as they were (the fixture's throughput
    # is 0.0) and appends steps 3-4, measured now, with the old run's losses.
    records = [json.loads(line) for line in (old_run / "run/instruct/metrics.jsonl").read_text().splitlines()]
    old_records = [json.loads(line) for line in (FIXTURE / "run/instruct/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in old_records] == [1, 2, 3, 4]
    assert records[:2] == old_records[:2]
    assert all(r["samples_per_s"] > 0 for r in records[2:])
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in old_records], rel=1e-5)
