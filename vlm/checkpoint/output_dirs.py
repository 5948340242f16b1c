"""Output folders vlm writes whole (exports, merges, runs): never clobbered, replaced atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import yaml

from vlm.checkpoint.fsio import atomic_dir
from vlm.core.errors import ConfigError


def check_output_dir(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """``out`` as a Path; a ConfigError naming ``flag`` when it exists, is not empty and
    ``overwrite`` is False (so nothing vlm did not write is ever deleted by accident)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {out}: folder exists and is not empty; choose another folder, "
                          "or pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def replacing_output_dir(out: str | Path, overwrite: bool, flag: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder beside ``out`` that replaces it atomically when the block
    completes (after :func:`check_output_dir`); on an error ``out`` is left as it was."""
    out = check_output_dir(out, overwrite, flag)
    with atomic_dir(out) as tmp:
        yield tmp


RUN_CONFIG = "config.yaml"


def _is_run_of(out: Path, config: dict) -> Optional[bool]:
    """None when ``out`` holds no vlm run config (``config.yaml``, or a stage's
    ``<stage>/config.yaml``); else whether one of them is ``config`` (resolved)."""
    found = False
    for path in [out / RUN_CONFIG, *sorted(out.glob(f"*/{RUN_CONFIG}"))]:
        if not path.is_file():
            continue
        try:
            saved = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError, OSError):
            continue
        if isinstance(saved, dict) and "stages" in saved and "model" in saved:
            if saved == config:
                return True
            found = True
    return False if found else None


@contextlib.contextmanager
def run_output_dir(out: str | Path, config: dict, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Guard the folder ``vlm run`` / ``vlm train`` writes (``out_dir``).

    A missing or empty folder, or a run folder of the same config (its ``config.yaml`` equal to
    ``config``, the resolved run config), is used as it is. ``resume`` continues a vlm run folder
    (any config). Anything else is refused with a ConfigError unless ``overwrite``: then the old
    folder is moved aside, deleted when the block completes and put back if it fails.
    """
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or replace it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    same = _is_run_of(out, config) if out.is_dir() else None
    if not out.is_dir() or not any(out.iterdir()) or same or (resume and same is not None):
        yield out
        return
    if resume:
        raise ConfigError(f"--resume: {out} is not a vlm run folder (no {RUN_CONFIG}); nothing to resume")
    if not overwrite:
        why = "a run of another config" if same is False else f"not a vlm run folder (no {RUN_CONFIG})"
        raise ConfigError(f"--out {out}: folder is not empty and is {why}; choose another folder, pass "
                          "--resume to continue it, or --overwrite to replace it")
    aside = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, aside)
    try:
        yield out
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
