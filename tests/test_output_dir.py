"""Output folders: a non-empty one is refused without --overwrite, replaced atomically with it."""

from __future__ import annotations

import pytest

from vlm.checkpoint.output_dirs import replacing_output_dir
from vlm.core.errors import ConfigError


def test_non_empty_output_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .*out: folder exists and is not empty.*--overwrite"):
        with replacing_output_dir(out, overwrite=False):
            pass
    assert (out / "precious.txt").read_text() == "mine"


def test_overwrite_replaces_atomically_and_a_failure_keeps_the_old(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replacing_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with replacing_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_empty_or_missing_output_needs_no_flag(tmp_path):
    with replacing_output_dir(tmp_path / "new", overwrite=False) as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "new" / "a").is_file()
