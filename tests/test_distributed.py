"""Two processes on CPU (``torchrun`` over gloo): FSDP2 trains as DDP does, survives a SIGKILL
after a checkpoint and resumes exactly, logs losses averaged over ranks; launches that cannot give
what they announce are refused before training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

import vlm.app.stages

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def launch(args, timeout=300, **env):
    """Run a command with this checkout importable and one thread per process."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", **env)
    return subprocess.run(args, env=environment, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


def component_weights(final: Path) -> dict:
    out = {}
    for comp in ("vision", "connector"):
        out.update({f"{comp}.{k}": v for k, v in load_file(str(final / f"{comp}.safetensors")).items()})
    out.update({f"llm.{k}": v for k, v in load_file(str(final / "llm_adapter" / "adapter_model.safetensors")).items()})
    return out


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stages(shapes, base_final=None):
    captions = {"format": "coco_captions",
                "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    return {
        "base": {"train": {"vision": "full", "connector": "full", "llm": "full"}, "data": [captions],
                 "batch_size": 8, "max_steps": 1, "warmup_ratio": 0.0},
        # frozen LLM base + LoRA adapters inside the FSDP units of the LLM blocks, fully trained
        # vision blocks, a fully trained connector in the root unit
        "s": {"init_from": str(base_final), "train": {"vision": "full", "connector": "full", "llm": "lora"},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "data": [captions], "learning_rate": 3e-3,
              "batch_size": 3, "grad_accum": 2, "max_steps": 6, "save_every": 3, "log_every": 1,
              "warmup_ratio": 0.2},
    }


def test_fsdp_matches_ddp_survives_sigkill_and_resumes_exactly(tmp_path, tokenizer_dir, shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data, tmp_path / "run" / "base" / "final"))
    vlm.app.stages.run_stage(cfg, "base")
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    fsdp = ["stages.s.strategy=fsdp", "stages.s.gradient_checkpointing=true"]

    # uninterrupted: DDP, then FSDP (with gradient checkpointing)
    done = launch(torchrun(WORKER, "train", config, "s", str(tmp_path / "ddp"), "--then", str(tmp_path / "fsdp"), *fsdp))
    assert done.returncode == 0, done.stderr[-3000:]
    # FSDP killed after step 4 (checkpoint at step 3), then `vlm train --resume` from the CLI
    killed = launch(torchrun(WORKER, "train", config, "s", str(tmp_path / "resumed"), "--kill-after-step", "4", *fsdp))
    assert killed.returncode != 0
    out = tmp_path / "resumed" / "s"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000003"] and not (out / "final").exists()
    resumed = launch(torchrun("-m", "vlm", "train", config, *fsdp, "--stage", "s", "--out", str(tmp_path / "resumed"),
                              "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    ddp_w = component_weights(tmp_path / "ddp" / "s" / "final")
    fsdp_w = component_weights(tmp_path / "fsdp" / "s" / "final")
    resumed_w = component_weights(out / "final")
    start = component_weights(tmp_path / "fsdp" / "s" / "checkpoints" / "step_0000003")
    assert ddp_w.keys() == fsdp_w.keys() == resumed_w.keys() and any("lora_A" in k for k in ddp_w)
    for key in ddp_w:
        assert torch.equal(fsdp_w[key], resumed_w[key]), key
        assert torch.allclose(fsdp_w[key], ddp_w[key], atol=1e-5, rtol=0), (key, (fsdp_w[key] - ddp_w[key]).abs().max())
    assert any(not torch.equal(start[k], fsdp_w[k]) for k in start)  # training moved the weights
    manifest = json.loads((out / "final" / "manifest.json").read_text())
    assert manifest["llm"][-1]["adapter"] == "llm_adapter" and len(manifest["llm"][-1]["sha256"]) == 64

    # the logged loss is the mean over both ranks' samples, not rank 0's
    for run in ("ddp", "fsdp"):
        records = read_jsonl(tmp_path / run / "s" / "metrics.jsonl")
        ranks = [read_jsonl(tmp_path / run / "s" / f"rank_losses_{r}.jsonl") for r in (0, 1)]
        assert [r["step"] for r in records] == list(range(1, 7))
        for record, r0, r1 in zip(records, *ranks):
            mean = (r0["loss"] * r0["samples"] + r1["loss"] * r1["samples"]) / (r0["samples"] + r1["samples"])
            assert record["loss"] == pytest.approx(mean, rel=1e-6)
            assert record["samples"] == r0["samples"] + r1["samples"] == 12
        assert any(abs(r0["loss"] - r1["loss"]) > 1e-3 for r0, r1 in zip(*ranks))
    fsdp_losses = [r["loss"] for r in read_jsonl(tmp_path / "fsdp" / "s" / "metrics.jsonl")]
    assert [r["loss"] for r in read_jsonl(out / "metrics.jsonl")] == fsdp_losses


@pytest.mark.slow  # a fifth launch; the check itself is unit-tested in test_strategies.py
def test_accelerate_launch_that_runs_one_process_is_refused(tmp_path, tokenizer_dir, shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data, tmp_path / "none"))
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    done = launch(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "vlm", "train", config,
                   "--stage", "base", "--out", str(tmp_path / "out")], timeout=120)
    assert done.returncode != 0
    assert "started ONE process" in done.stderr and "torchrun --nproc_per_node 2" in done.stderr
    assert not (tmp_path / "out" / "base" / "checkpoints").exists() and cfg


def test_distributed_eval_answers_each_question_once_and_matches_one_process(tmp_path, tokenizer_dir, shapes_data,
                                                                              capsys):
    from vlm.app.recipes import run_evals

    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data, tmp_path / "none"))
    final = vlm.app.stages.run_stage(cfg, "base")
    test = shapes_data["test"]
    evals = {
        "vqa": {"task": "vqa", "max_new_tokens": 4, "batch_size": 3,
                "data": {"format": "vqav2", "args": {"questions_path": test["questions"],
                                                     "annotations_path": test["annotations"],
                                                     "image_root": test["image_root"],
                                                     "image_pattern": test["image_pattern"]}}},
    }
    import yaml

    recipe = yaml.safe_load(Path(sorted(tmp_path.glob("recipe_*.yaml"))[-1]).read_text())
    recipe["evals"] = evals
    config = tmp_path / "with_evals.yaml"
    config.write_text(yaml.safe_dump(recipe))
    from vlm.app.wiring import load_run_config as load_config

    one = run_evals(load_config(config, out_dir=str(tmp_path / "one")), checkpoint=str(final))
    two = launch(torchrun("-m", "vlm", "eval", str(config), "--checkpoint", str(final), "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    printed = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0]) == json.loads(json.dumps(one))  # printed by rank 0 only
    for name in ("vqa_results.json", "vqa_per_question.json"):
        assert (tmp_path / "two" / "eval" / name).read_text() == (tmp_path / "one" / "eval" / name).read_text(), name
    answered = [r["question_id"] for r in json.loads((tmp_path / "two" / "eval" / "vqa_results.json").read_text())]
    questions = [q["question_id"] for q in json.loads(Path(test["questions"]).read_text())["questions"]]
    assert sorted(answered) == sorted(questions) and len(set(answered)) == len(answered) > 2
