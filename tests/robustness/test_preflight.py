"""The check pass before training (vlm.app.preflight): one case per rule, each refused by
``vlm run`` / ``vlm train`` with exit 2 and one line before the first stage trains, nothing
written; and the plans each rule must let through."""

from __future__ import annotations

import copy

import pytest
from robust_helpers import Project, error_line, run_vlm, snapshot

import vlm.app.stages as stages
from vlm.app.preflight import RULES, preflight
from vlm.app.wiring import load_run_config
from vlm.core.errors import ConfigError


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    return Project(tmp_path, shapes_data, tokenizer_dir)


@pytest.fixture
def no_training(monkeypatch):
    """Stages that never train: a rule that lets a plan through reaches run_stage, recorded here."""
    started = []
    monkeypatch.setattr(stages, "run_stage", lambda cfg, name, resume=False: started.append(name) or "skipped")
    return started


def second_stage(project, **changes):
    """A stage ``next`` after ``align``, starting from its output."""
    stage = copy.deepcopy(project.stage())
    stage["init_from"] = str(project.out / "align" / "final")
    stage.update(changes)
    project.recipe["stages"]["next"] = stage
    return stage


def refused(project, capsys, command="train"):
    """Run the recipe; the one error line, after checking exit 2 and that nothing was written."""
    recipe = project.write()
    before = snapshot(project.root)
    code, _, err = run_vlm([command, recipe, "--out", project.out], capsys)
    assert code == 2, err
    assert not project.out.exists() and snapshot(project.root) == before
    return error_line(err)


def case_out_dir(project, capsys):
    project.out.write_text("a file where the run folder should be")
    recipe = project.write()
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    assert code == 2 and f"out_dir {project.out}: exists and is not a folder" in error_line(err)


def case_init_from(project, capsys):
    second_stage(project, init_from=str(project.root / "elsewhere" / "final"))
    line = refused(project, capsys)
    assert "stages.next.init_from:" in line and "elsewhere" in line and "no stage of this launch writes it" in line


def case_lora_saveable(project, capsys):
    # a second stage starting from nothing: LoRA on the random LLM could never be saved. Refused
    # before align trains, not after both stages.
    second_stage(project, init_from=None, train={"vision": "frozen", "connector": "full", "llm": "lora"})
    line = refused(project, capsys)
    assert "stages.next.train: llm: LoRA on randomly initialised weights cannot be saved" in line


def case_data_files(project, capsys):
    missing = project.root / "later.jsonl"
    second_stage(project, data=[{"format": "jsonl", "args": {"path": str(missing)}}])
    line = refused(project, capsys)
    assert line.endswith(f"stages.next.data.0.args.path: {missing}: no such file or folder"), line


CASES = {"out_dir": case_out_dir, "init_from": case_init_from, "lora_saveable": case_lora_saveable,
         "data_files": case_data_files}


def test_every_rule_has_a_case():
    assert list(CASES) == list(RULES)


@pytest.mark.parametrize("rule", list(CASES))
def test_rule_refuses_before_training(rule, project, capsys, no_training):
    CASES[rule](project, capsys)
    assert no_training == []


def test_an_evaluation_file_missing_stops_vlm_run_before_training(project, capsys, no_training):
    missing = project.root / "test_captions.json"
    project.recipe["evals"]["caption"]["data"]["args"]["path"] = str(missing)
    line = refused(project, capsys, command="run")
    assert f"evals.caption.data.args.path: {missing}: no such file or folder" in line
    assert no_training == []


def test_plans_the_rules_let_through(project, capsys, no_training):
    # init_from the output of an earlier stage of the launch, with LoRA on the LLM it saved (as
    # initialised: there is no pretrained LLM)
    second_stage(project, train={"vision": "frozen", "connector": "full", "llm": "lora"})
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    assert code == 0, err
    assert no_training == ["align", "next"]


@pytest.mark.parametrize("step", ["shapes", "extra_shapes", "scenes", "multi"])
def test_data_a_prepare_step_writes_is_not_required_up_front(project, step):
    # vlm run writes it before the stages; vlm train (which prepares nothing) needs it there
    generated = project.root / "generated"
    written = {"out": str(generated), "num_train": 4, "num_test": 4}
    project.recipe["prepare"] = {step: [written] if step == "extra_shapes" else written}
    project.stage()["data"][0]["args"] = {"path": str(generated / "train" / "captions.json"),
                                          "image_root": str(generated / "train" / "images")}
    cfg = load_run_config(project.write())
    preflight(cfg, ["align"], whole_recipe=True)
    with pytest.raises(ConfigError, match="stages.align.data.0.args.path: .*generated.*: no such file"):
        preflight(cfg, ["align"], whole_recipe=False)
