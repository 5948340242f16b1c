"""Writing folders safely: atomic replacement, stale temporaries, I/O errors naming the path.

Writing folders safely: atomic replacement (temporary name, fsync, rename), removal of what
dead writers left, I/O errors that name the path, file checksums.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, List

from safetensors import SafetensorError

from vlm.core.errors import CheckpointError, describe_os_error

logger = logging.getLogger(__name__)


TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_tmp(parent: str | Path) -> List[Path]:
    """Delete the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders that :func:`atomic_dir` left in
    ``parent`` when the process PID died mid-write (and only those: nothing vlm did not write)."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = TMP_PATTERN.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d stale temporary folder(s) of dead runs in %s", len(removed), parent)
    return removed


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def io_error(exc: OSError, path: Path, doing: str) -> CheckpointError:
    """A CheckpointError for an I/O failure: says what (disk full, permission...) and names the path."""
    return CheckpointError(f"{doing} {path}: {describe_os_error(exc, exc.filename or path)}")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only if the block completes. Its files
    are fsynced before the rename; stale temporary folders of dead processes are removed first.
    An OSError (disk full, permission) becomes a CheckpointError naming the path."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise io_error(exc, final.parent, "cannot write") from exc
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise io_error(exc, final, "cannot write") from exc
        if isinstance(exc, (RuntimeError, SafetensorError)) and _looks_like_short_write(exc):
            free = shutil.disk_usage(final.parent).free / 2**20
            raise CheckpointError(f"cannot write {final}: the write failed ({str(exc).splitlines()[0]}); "
                                  f"is the disk full? {free:.0f} MiB free there") from exc
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _looks_like_short_write(exc: BaseException) -> bool:
    """torch.save / safetensors report a full disk as a failed or short write, not an OSError."""
    text = str(exc).lower()
    return any(k in text for k in ("unexpected pos", "failed to write", "write failed", "no space", "file write"))


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


