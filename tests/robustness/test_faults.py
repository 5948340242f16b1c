"""Faults: a diverging run, a full disk, a permission error, SIGKILL during training and during a
checkpoint write (resume is bit-identical), stale temporary folders of dead runs."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config
from robust_helpers import Project, error_line, run_vlm, snapshot
from safetensors.torch import load_file

import vlm.app.stages
import vlm.checkpoint.fsio
import vlm.checkpoint.train_state
import vlm.training.objectives.lm

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    project = Project(tmp_path, shapes_data, tokenizer_dir)
    project.stage().update(max_steps=4, save_every=1, batch_size=4)
    return project


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for p in folder.rglob("*.safetensors") for t in load_file(str(p)).values())


def test_nan_run_stops_naming_stage_and_step_and_saves_no_nan(project, capsys):
    code, _, err = run_vlm(["train", project.write(), "stages.align.learning_rate=1e30", "--out", project.out],
                           capsys)
    line = error_line(err)
    assert code == 2 and "stage 'align' step" in line and "non-finite" in line and "on_nonfinite: skip" in line
    stage = project.out / "align"
    assert not (stage / "final").exists()
    assert list((stage / "checkpoints").iterdir()), "the checkpoints before the divergence are kept"
    assert all_finite(stage)
    records = [json.loads(r) for r in (stage / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN logged


def test_nan_run_with_skip_stops_after_the_skip_limit(project, capsys):
    code, _, err = run_vlm(["train", project.write(), "stages.align.learning_rate=1e30",
                            "stages.align.on_nonfinite=skip", "stages.align.max_nonfinite_skips=2",
                            "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and "3 steps skipped" in line and "max_nonfinite_skips = 2" in line
    assert all_finite(project.out / "align")


def test_one_nan_step_is_skipped_and_counted(project, tokenizer_dir, monkeypatch, caplog):
    project.stage()["on_nonfinite"] = "skip"
    calls = {"n": 0}
    original = vlm.training.objectives.lm.LanguageModeling.forward

    def nan_once(self, model, batch):
        out = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(vlm.training.objectives.lm.LanguageModeling, "forward", nan_once)
    cfg = run_config(project.root, tokenizer_dir, project.recipe["stages"], out_dir=project.out)
    with caplog.at_level(logging.WARNING):
        final = vlm.app.stages.run_stage(cfg, "align")
    assert "stage 'align' step 2: non-finite loss nan; step skipped (1 of at most 10)" in caplog.text
    assert all_finite(final) and calls["n"] == 5  # 4 optimizer steps took 5 batches
    steps = [json.loads(r)["step"] for r in (project.out / "align" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("error,needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 423616 vs 423508"), "is the disk full?"),
], ids=["enospc", "permission", "short_write"])
def test_write_failure_names_the_path_and_keeps_the_last_checkpoint(project, capsys, monkeypatch, error, needle):
    calls = {"n": 0}
    original = vlm.checkpoint.train_state.save_training_state

    def failing(folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            if isinstance(error, OSError):
                error.filename = str(folder / vlm.checkpoint.train_state.TRAINING_STATE)
            raise error
        return original(folder, *args, **kwargs)

    monkeypatch.setattr("vlm.training.trainer.save_training_state", failing)
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    line = error_line(err)
    checkpoints = project.out / "align" / "checkpoints"
    assert code == 2 and needle in line and "step_0000002" in line, line
    assert [p.name for p in checkpoints.iterdir()] == ["step_0000001"]  # no temporary folder left
    assert vlm.checkpoint.train_state.load_training_state(checkpoints / "step_0000001")["position"]["step"] == 1


def test_stale_tmp_folders_of_dead_runs_are_removed_and_nothing_else(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parent = tmp_path / "checkpoints"
    stale = [parent / f".step_0000002.tmp-{dead.pid}", parent / f".final.old-{dead.pid}"]
    alive = parent / f".step_0000003.tmp-{os.getppid()}"
    users = [parent / ".notes.tmp-abc", parent / "step.tmp-1"]
    for folder in stale + [alive] + users:
        folder.mkdir(parents=True)
        (folder / "x").write_text("x")
    with vlm.checkpoint.fsio.atomic_dir(parent / "step_0000004") as tmp:
        (tmp / "w").write_text("w")
    assert not any(p.exists() for p in stale)
    assert alive.exists() and all(p.exists() for p in users)
    assert (parent / "step_0000004" / "w").read_text() == "w"


def kill_run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE.parent}", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "kill_run.py"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_same_run(ref: Path, other: Path):
    for path in sorted((ref / "final").rglob("*.safetensors")):
        a, b = load_file(str(path)), load_file(str(other / "final" / path.relative_to(ref / "final")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
    losses = lambda folder: [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert losses(ref) == losses(other)


@pytest.mark.parametrize("mode,n", [("step", 3), pytest.param("write", 2, marks=pytest.mark.slow)],
                         ids=["during_training", "during_checkpoint_write"])
def test_sigkill_then_resume_is_bit_identical(project, mode, n):
    project.stage().update(max_steps=5, save_every=2)
    project.stage()["train"]["llm"] = "full"  # more weights that move
    recipe = project.write()
    ref, killed = project.root / "ref", project.root / "killed"
    done = kill_run(recipe, killed, mode, n, "--reference", ref)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    checkpoints = killed / "align" / "checkpoints"
    if mode == "write":
        assert [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name], "the write was interrupted"
    assert not (killed / "align" / "final").exists()
    done = kill_run(recipe, killed, "resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(ref / "align", killed / "align")
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "stale temporary folders removed"
    assert snapshot(ref / "align" / "final").keys() == snapshot(killed / "align" / "final").keys()


class TwoRanks:
    """An accelerator stand-in whose reduce adds another rank's values."""

    num_processes = 2
    device = "cpu"
    scaler = None

    def __init__(self, other):
        self.other = other

    def reduce(self, tensor, reduction="sum"):
        return tensor + torch.as_tensor(self.other, dtype=tensor.dtype)


def test_ranks_agree_on_skipping_a_batch_empty_on_one_of_them():
    from vlm.data.batch import Batch
    from vlm.training.skips import SkipCounter

    counter = SkipCounter("align", 0.9, batches_per_epoch=10, accelerator=TwoRanks([0, 4, 1]))
    batch = Batch(input_ids=torch.zeros(4, 3, dtype=torch.long), labels=torch.zeros(4, 3, dtype=torch.long))
    assert counter.observe(batch, 1) is False  # this rank has 4 samples, the other none: both skip
    assert (counter.samples, counter.skipped_samples, counter.skipped_batches) == (8, 4, 1)


def test_ranks_agree_on_a_non_finite_step_seen_by_one_of_them():
    from vlm.config import NonFinitePolicy, OnNonFinite
    from vlm.core.errors import TrainingError
    from vlm.training.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(NonFinitePolicy(OnNonFinite.stop, 3), "align", TwoRanks([1.0]))
    assert guard.observe_loss(torch.tensor(1.0))
    with pytest.raises(TrainingError, match="stage 'align' step 7: non-finite loss or gradient norm on another process"):
        guard.step_ok(0.5, [], 7)  # finite here, not on the other rank
