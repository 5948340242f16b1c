"""`vlm run` / `vlm train` never delete what vlm did not write: a non-empty --out that is not a run
of the same config is refused unless --resume (a vlm run folder) or --overwrite (replaced)."""

from __future__ import annotations

import pytest
from robust_helpers import Project, error_line, run_vlm, snapshot


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    project = Project(tmp_path, shapes_data, tokenizer_dir)
    project.stage()["max_steps"] = 1
    return project


def users_folder(project):
    project.out.mkdir()
    (project.out / "thesis.tex").write_text("years of work")
    return snapshot(project.out)


@pytest.mark.parametrize("command", ["train", "run"])
def test_non_empty_foreign_out_is_refused_and_kept(project, capsys, command):
    before = users_folder(project)
    code, _, err = run_vlm([command, project.write(), "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and str(project.out) in line and "not a vlm run folder" in line and "--overwrite" in line
    assert snapshot(project.out) == before


def test_resume_of_a_foreign_folder_is_refused(project, capsys):
    before = users_folder(project)
    code, _, err = run_vlm(["train", project.write(), "--out", project.out, "--resume"], capsys)
    assert code == 2 and "nothing to resume" in error_line(err)
    assert snapshot(project.out) == before


def test_resume_and_overwrite_together_are_refused(project, capsys):
    before = users_folder(project)
    code, _, err = run_vlm(["train", project.write(), "--out", project.out, "--resume", "--overwrite"], capsys)
    assert code == 2 and "choose one" in error_line(err)
    assert snapshot(project.out) == before


def test_same_config_reruns_another_config_needs_a_flag_overwrite_replaces(project, capsys):
    recipe = project.write()
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    assert code == 0, err[-2000:]
    assert (project.out / "config.yaml").is_file() and (project.out / "align" / "final").is_dir()
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)  # same config: its own folder
    assert code == 0, err[-2000:]
    before = snapshot(project.out)
    code, _, err = run_vlm(["train", recipe, "stages.align.learning_rate=0.01", "--out", project.out], capsys)
    assert code == 2 and "a run of another config" in error_line(err)
    assert snapshot(project.out) == before
    (project.out / "stale.txt").write_text("old")
    code, _, err = run_vlm(["train", recipe, "stages.align.learning_rate=0.01", "--out", project.out,
                            "--overwrite"], capsys)
    assert code == 0, err[-2000:]
    assert not (project.out / "stale.txt").exists() and (project.out / "align" / "final").is_dir()
    assert not [p for p in project.root.iterdir() if p.name.startswith(".out.old")]


def test_overwrite_that_fails_puts_the_old_folder_back(project, capsys):
    before = users_folder(project)
    project.stage()["data"][0]["args"]["path"] = str(project.root / "missing.json")
    code, _, err = run_vlm(["train", project.write(), "--out", project.out, "--overwrite"], capsys)
    assert code == 2 and "missing.json" in error_line(err)
    assert snapshot(project.out) == before
