"""The command's error contract: expected errors are one line and exit 2; --debug (anywhere on
the line) or VLM_DEBUG=1 shows their traceback; a genuine bug always keeps its traceback."""

from __future__ import annotations

import errno

import pytest
from robust_helpers import Project, error_line, run_vlm

import vlm.app.cli
import vlm.core.errors
from vlm.app.cli import main
from vlm.core.errors import ConfigError


@pytest.fixture
def bad_recipe(tmp_path, shapes_data, tokenizer_dir):
    project = Project(tmp_path, shapes_data, tokenizer_dir)
    project.stage()["batch_size"] = 0
    return project.write(), tmp_path / "out"


@pytest.mark.parametrize("argv_of", [
    lambda r, o: ["--debug", "train", r, "--out", o],
    lambda r, o: ["train", r, "--out", o, "--debug"],
], ids=["before", "after"])
def test_debug_flag_shows_the_traceback(bad_recipe, argv_of):
    with pytest.raises(ConfigError, match="stages.align.batch_size = 0"):
        main([str(a) for a in argv_of(*bad_recipe)])


def test_vlm_debug_env_shows_the_traceback(bad_recipe, monkeypatch):
    monkeypatch.setenv("VLM_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", str(bad_recipe[0]), "--out", str(bad_recipe[1])])


def test_without_debug_one_line_and_exit_2(bad_recipe, capsys, monkeypatch):
    monkeypatch.setenv("VLM_DEBUG", "0")
    code, _, err = run_vlm(["train", *bad_recipe[:1], "--out", bad_recipe[1]], capsys)
    assert code == 2 and "stages.align.batch_size = 0" in error_line(err)
    assert len(err.strip().splitlines()) == 1


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        return 1 / 0

    monkeypatch.setattr(vlm.app.cli, "cmd_models", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["models"])


def test_an_os_error_is_one_line_with_the_path_and_what_to_do(monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.bin")

    monkeypatch.setattr(vlm.app.cli, "cmd_models", full)
    code, _, err = run_vlm(["models"], capsys)
    assert code == 2 and error_line(err) == "error: /data/out/x.bin: disk full; free space or write elsewhere"


@pytest.mark.parametrize("flags, named", [
    (["--jitter", "0.5"], "jitter must be in [0, 0.15], got 0.5"),
    (["--shape-scale", "5"], "shape_scale must be in [0.1, 1.6], got 5"),
    (["--colors", "red"], "colors: at least two distinct names"),
])
def test_bad_shapes_options_are_one_line_and_write_nothing(tmp_path, capsys, flags, named):
    out = tmp_path / "shapes"
    code, _, err = run_vlm(["data", "shapes", "--out", out, *flags], capsys)
    assert code == 2 and named in error_line(err)
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_naming_plugin_modules_is_refused_without_importing_them(tmp_path, capsys):
    import json
    import sys

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "plugins.json").write_text(json.dumps(["vlm_untrusted_plugin_mod"]))
    from vlm.core.plugins import load_saved_plugins

    with pytest.raises(vlm.core.errors.CheckpointError, match="VLM_PLUGINS=vlm_untrusted_plugin_mod"):
        load_saved_plugins(folder)
    assert "vlm_untrusted_plugin_mod" not in sys.modules
