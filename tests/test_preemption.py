"""Preemption and restarts: SIGTERM / SIGUSR1 end a stage at a step boundary with a checkpoint and
exit 75, in one process and under torchrun; a torchrun restart resumes by itself; ``keep_last``
keeps the newest step checkpoints and nothing else is touched."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config, run_vlm
from preempt_worker import SignalAfterStep
from safetensors.torch import load_file

import vlm.app.stages
from vlm.checkpoint.train_state import load_training_state
from vlm.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("preempt_worker.py"))


def stage(shapes, **extra) -> dict:
    captions = {"format": "coco_captions",
                "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    return {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "full"}, "data": [captions],
                  "learning_rate": 2e-3, "batch_size": 4, "max_steps": 5, "save_every": 2, "log_every": 1,
                  "warmup_ratio": 0.0, **extra}}


def recipe(tmp_path, tokenizer_dir, shapes, **extra) -> str:
    run_config(tmp_path, tokenizer_dir, stage(shapes, **extra))
    return str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])


def assert_same_final(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for rel in files:
        x, y = load_file(str(a / rel)), load_file(str(b / rel))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), rel


def preempted_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("preempted at step")]


def with_signal(monkeypatch, signum: int, step: int) -> None:
    """Stage builds in this process get a callback sending ``signum`` after ``step``."""
    build_stage = vlm.app.stages.build_stage
    monkeypatch.setattr(vlm.app.stages, "build_stage", lambda *a, callbacks=(), **k: build_stage(
        *a, callbacks=[*callbacks, SignalAfterStep(signum, step)], **k))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer_dir, shapes_data):
    """The recipe and its uninterrupted run in one process."""
    root = tmp_path_factory.mktemp("one")
    config = recipe(root, tokenizer_dir, shapes_data)
    vlm.app.stages.run_stage(run_config(root, tokenizer_dir, stage(shapes_data), out_dir=root / "ref"), "s")
    return {"root": root, "config": config, "final": root / "ref" / "s" / "final"}


def test_sigterm_checkpoints_the_step_exits_75_and_resume_is_bit_identical(one_process, monkeypatch, capsys):
    out = one_process["root"] / "sigterm"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        with_signal(patch, signal.SIGTERM, 3)
        code, _, err = run_vlm(["train", one_process["config"], "--out", out], capsys)
    step_3 = out / "s" / "checkpoints" / "step_0000003"
    assert code == 75, err[-3000:]
    assert preempted_lines(err) == [f"preempted at step 3 of stage s: checkpoint written to {step_3}; "
                                    "rerun with --resume"] and "error:" not in err
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"
    assert load_training_state(step_3)["position"]["step"] == 3  # not a save_every step: written for the signal
    assert not (out / "s" / "final").exists()

    code, _, err = run_vlm(["train", one_process["config"], "--out", out, "--resume"], capsys)
    assert code == 0, err[-3000:]
    assert_same_final(one_process["final"], out / "s" / "final")


def test_a_torchrun_restart_resumes_without_the_flag(one_process, monkeypatch, capsys, caplog):
    out = one_process["root"] / "restart"
    with monkeypatch.context() as patch:
        with_signal(patch, signal.SIGUSR1, 2)  # a save_every step: its checkpoint is the one written
        code, _, err = run_vlm(["train", one_process["config"], "--out", out], capsys)
    assert code == 75 and len(preempted_lines(err)) == 1, err[-3000:]
    assert sorted(p.name for p in (out / "s" / "checkpoints").iterdir()) == ["step_0000002"]

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    with caplog.at_level(logging.INFO):
        code, _, err = run_vlm(["train", one_process["config"], "--out", out], capsys)
    assert code == 0, err[-3000:]
    assert "torchrun restart 1 (TORCHELASTIC_RESTART_COUNT): resuming from the latest checkpoint" in caplog.text
    assert f"resumed from {out / 's' / 'checkpoints' / 'step_0000002'} at step 2" in caplog.text
    assert_same_final(one_process["final"], out / "s" / "final")


def test_keep_last_keeps_the_newest_step_checkpoints_and_nothing_else_is_touched(tmp_path, tokenizer_dir,
                                                                                  shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, stage(shapes_data, max_steps=6, save_every=1, keep_last=2))
    checkpoints = Path(cfg.out_dir) / "s" / "checkpoints"
    for name in ("notes", "step_9"):  # a user's folder, and a step-like folder vlm did not write
        (checkpoints / name).mkdir(parents=True)
        (checkpoints / name / "mine.txt").write_text(name)
    final = vlm.app.stages.run_stage(cfg, "s")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["notes", "step_0000004", "step_0000005", "step_9"]
    assert (checkpoints / "notes" / "mine.txt").read_text() == "notes"
    assert (checkpoints / "step_9" / "mine.txt").read_text() == "step_9"
    assert (final / "manifest.json").is_file()


def test_keep_last_zero_is_refused_at_load(tmp_path, tokenizer_dir, shapes_data):
    with pytest.raises(ConfigError, match=r"stages\.s\.keep_last = 0: must be >= 1"):
        run_config(tmp_path, tokenizer_dir, stage(shapes_data, keep_last=0))


# ---------------------------------------------------------------------------------------------
# two processes (torchrun over gloo)


def launch(args, timeout=240, **env):
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` with this checkout
    importable and one thread per process."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                "TORCHELASTIC_RESTART_COUNT", "VLM_TEST_SIGNAL")}
    environment.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1", **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tokenizer_dir, shapes_data):
    """The recipe, and a run of it on two processes where only rank 1 gets SIGUSR1 after step 3."""
    root = tmp_path_factory.mktemp("two")
    config = recipe(root, tokenizer_dir, shapes_data)
    out = root / "usr1"
    done = launch([WORKER, "train", config, "--out", str(out)], VLM_TEST_SIGNAL="SIGUSR1:3:1")
    return {"root": root, "config": config, "out": out, "done": done}


@pytest.fixture(scope="module")
def two_processes_reference(two_processes):
    """The uninterrupted run's ``final`` on two processes."""
    ref = two_processes["root"] / "ref"
    done = launch(["-m", "vlm", "train", two_processes["config"], "--out", str(ref)])
    assert done.returncode == 0, done.stderr[-3000:]
    return ref / "s" / "final"


def test_two_processes_stop_together_after_the_step_one_of_them_got_the_signal(two_processes):
    done, out = two_processes["done"], two_processes["out"]
    step_3 = out / "s" / "checkpoints" / "step_0000003"
    # the workers exit 75 (torchrun reports the first to fail, may SIGTERM a slower one once the
    # checkpoint is complete, and exits 1)
    assert done.returncode != 0 and "exitcode  : 75" in done.stderr, done.stderr[-3000:]
    line = f"preempted at step 3 of stage s: checkpoint written to {step_3}; rerun with --resume\n"
    assert done.stderr.count("preempted at step") == done.stderr.count(line) >= 1, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "s" / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    assert load_training_state(step_3)["position"]["step"] == 3 and not (out / "s" / "final").exists()


@pytest.mark.slow  # two more launches (~35 s)
def test_two_processes_resume_after_the_signal_is_bit_identical(two_processes, two_processes_reference):
    out = two_processes["out"]
    assert two_processes["done"].returncode != 0
    done = launch(["-m", "vlm", "train", two_processes["config"], "--out", str(out), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "at step 3" in done.stderr
    assert_same_final(two_processes_reference, out / "s" / "final")


@pytest.mark.slow  # two more launches, one of them restarted (~45 s)
def test_torchrun_restarts_a_killed_worker_and_finishes_the_same_run(two_processes, two_processes_reference):
    out = two_processes["root"] / "restarted"
    # rank 1 dies by SIGKILL after step 3 (the newest checkpoint is step 2); torchrun restarts both.
    # Without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the restarted group may read the dead worker's
    # gloo address from torchrun's shared store ("connectFullMesh failed", pytorch/pytorch#135712)
    done = launch(["--max-restarts", "1", WORKER, "train", two_processes["config"], "--out", str(out)],
                  VLM_TEST_SIGNAL="SIGKILL:3:1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the latest checkpoint" in done.stderr and "at step 2" in done.stderr
    assert_same_final(two_processes_reference, out / "s" / "final")


def test_resume_keeps_the_stages_that_finished(tmp_path, tokenizer_dir, shapes_data, monkeypatch, caplog):
    # stage a finished, b was preempted: --resume goes on with b and never rebuilds a
    first = stage(shapes_data, max_steps=2)["s"]
    second = {**first, "init_from": str(tmp_path / "run" / "a" / "final")}
    cfg = run_config(tmp_path, tokenizer_dir, {"a": first, "b": second})
    final_a = vlm.app.stages.run_stage(cfg, "a")
    weights = (final_a / "connector.safetensors").read_bytes()
    built = []
    build_stage = vlm.app.stages.build_stage
    monkeypatch.setattr(vlm.app.stages, "build_stage", lambda c, name, **k: built.append(name) or build_stage(
        c, name, **k))
    with caplog.at_level(logging.INFO, logger="vlm.app.stages"):
        assert vlm.app.stages.run_stage(cfg, "a", resume=True) == final_a
        vlm.app.stages.run_stage(cfg, "b", resume=True)
    assert built == ["b"] and (final_a / "connector.safetensors").read_bytes() == weights
    assert f"stage a: complete ({final_a}); --resume keeps it" in caplog.text
    assert (tmp_path / "run" / "b" / "final").is_dir()
