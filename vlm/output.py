"""Output folders that vlm writes as a whole (exports, imports, merges, runs): never clobber
what the user did not ask to replace, and replace atomically when asked."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from vlm.errors import ConfigError
from vlm.training.checkpoint import atomic_dir


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
