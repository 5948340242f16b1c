"""lmms-eval runs `--model vlm` (registered through the entry point pyproject.toml declares) on a
local offline task written here: generate_until and loglikelihood give vlm's own numbers."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import build_tiny_model, tiny_model_config, write_images
from PIL import Image
from test_hf_llava_interop import write_stage_output

from vlm.checkpoint.pretrained import load_pretrained
from vlm.evaluation.lmms_adapter import VLMLmms
from vlm.inference.generation import clean_answer, generate_answers
from vlm.inference.likelihood import loglikelihoods
from vlm.modeling.processing import build_processor

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[eval]')")

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "what color is the shape?"

UTILS = '''import ast
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def loglikelihood_results(doc, results):
    # lmms-eval 0.7.3 hands loglikelihood results over as str((ll, is_greedy))
    result = ast.literal_eval(results[0]) if isinstance(results[0], str) else results[0]
    return {"loglikelihood": result[0], "greedy": float(result[1])}
'''


def task_yaml(name: str, data: Path, output_type: str) -> str:
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\noutput_type: {output_type}\ndoc_to_visual: !function utils.doc_to_visual\n"
            "doc_to_text: !function utils.doc_to_text\ndoc_to_target: answer\n")
    if output_type == "generate_until":
        return head + ("generation_kwargs:\n  max_new_tokens: 8\n  temperature: 0\n  do_sample: false\n"
                       "  until: [\"\\n\\n\"]\nprocess_results: !function utils.process_results\n"
                       "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                       "metadata:\n  - version: 0.0\n")
    return head + ("process_results: !function utils.loglikelihood_results\nmetric_list:\n"
                   "  - metric: loglikelihood\n    aggregation: mean\n    higher_is_better: true\n"
                   "  - metric: greedy\n    aggregation: mean\n    higher_is_better: true\n"
                   "metadata:\n  - version: 0.0\n")


def plugin_dir(folder: Path) -> Path:
    """A dist-info holding pyproject.toml's lmms_eval.models entry point, as `pip install` writes it."""
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    info = folder / "vlm_entry_points-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlm-entry-points\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items()))
    return folder


@pytest.mark.timeout(600)
def test_lmms_eval_runs_model_vlm_on_a_local_task(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer, seed=5), cfg, tokenizer)
    images = write_images(tmp_path / "images")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question_id": i, "image": p, "question": QUESTION, "answer": "red"}) + "\n"
                            for i, p in enumerate(images)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    (tasks / "vlm_local_gen.yaml").write_text(task_yaml("vlm_local_gen", data, "generate_until"))
    (tasks / "vlm_local_ll.yaml").write_text(task_yaml("vlm_local_ll", data, "loglikelihood"))
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(plugin_dir(tmp_path / "plugin"))])}
    done = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "vlm", "--model_args",
                           f"checkpoint={stage_out}", "--tasks", "vlm_local_gen,vlm_local_ll", "--include_path",
                           str(tasks), "--batch_size", "2", "--output_path", str(tmp_path / "out"), "--log_samples"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = {name: sorted((json.loads(line) for path in (tmp_path / "out").rglob(f"*samples_{name}.jsonl")
                             for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
               for name in ("vlm_local_gen", "vlm_local_ll")}
    assert [len(s) for s in samples.values()] == [3, 3], done.stderr[-3000:]

    # vlm's own numbers for the same requests
    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    processor = build_processor(model, tok, model_cfg)
    requests = []
    for path in images:
        with Image.open(path) as image:
            requests.append(VLMLmms.sample(QUESTION, [image.convert("RGB")]))
    answers = [clean_answer(a, ["\n\n"]) for a in generate_answers(model, processor, requests, max_new_tokens=8)]
    assert [s["filtered_resps"] for s in samples["vlm_local_gen"]] == answers and all(answers)
    expected = loglikelihoods(model, processor, requests, ["red"] * 3)
    got = [ast.literal_eval(s["filtered_resps"]) if isinstance(s["filtered_resps"], str) else s["filtered_resps"]
           for s in samples["vlm_local_ll"]]
    for (ll, greedy), (want, want_greedy) in zip(got, expected):
        assert abs(ll - want) < 1e-4 and greedy == want_greedy


def test_adapter_turns_a_request_into_one_user_turn():
    image = Image.new("RGB", (8, 8))
    sample = VLMLmms.sample("<image>\nIs there a cat?", [[image], image])
    assert sample.turns[0].content == "<image>\n<image>\nIs there a cat?" and len(sample.images) == 2
    assert VLMLmms.sample("text only", None).turns[0].content == "text only"
    # lmms-eval's video tasks give the video as a path (test_multi_image_video generates through it)
    video = VLMLmms.sample("What happens?", ["clip.mp4", image])
    assert video.turns[0].content == "<video>\n<image>\nWhat happens?"
    assert video.videos == ["clip.mp4"] and video.images == [image]
