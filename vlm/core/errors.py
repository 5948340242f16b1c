"""The user-facing errors of vlm: one class per kind of bad input, all under :class:`VLMError`.

An expected error (a bad config, a malformed data file, an unreadable image, a broken
checkpoint...) is one of these, and its message names the file, the record or line, the field,
and what to do. The ``vlm`` command prints such an error as one line and exits 2 (75 for
:class:`TrainingPreempted`); anything else is a bug and keeps its traceback. This module imports
nothing heavy (no torch).
"""

from __future__ import annotations


class VLMError(Exception):
    """Base of every expected, user-facing error."""


class ConfigError(VLMError, ValueError):
    """A config that cannot be used; the message names the key and, where possible, a fix."""


class DataFormatError(VLMError, ValueError):
    """A dataset file is malformed; the message names the file, the record and the field."""


class ImageLoadError(VLMError, OSError):
    """An image that cannot be opened or decoded; the message names the file."""


class TemplateError(VLMError, ValueError):
    """A conversation the chat template cannot render."""


class CheckpointError(VLMError, ValueError):
    """A checkpoint or stage output that cannot be read or written; the message names the path."""


class FeatureCacheError(VLMError, ValueError):
    """A stage or model that cannot use the feature cache; the message names the config key."""


class LayoutError(VLMError, ValueError):
    """A model that another library's layout cannot hold (export / import); says which part."""


class TrainingError(VLMError, RuntimeError):
    """A training run that must stop (e.g. a non-finite loss); the message names the stage and step."""


class TrainingPreempted(VLMError):
    """A stage stopped by SIGTERM / SIGUSR1 after checkpointing a step boundary; the ``vlm``
    command prints the message and exits :attr:`exit_code` (75, ``EX_TEMPFAIL``: rerun with --resume)."""

    exit_code = 75

    def __init__(self, stage: str, step: int, checkpoint):
        super().__init__(f"preempted at step {step} of stage {stage}: checkpoint written to {checkpoint}; "
                         "rerun with --resume")
        self.stage, self.step, self.checkpoint = stage, step, checkpoint


def describe_os_error(exc: OSError, path=None) -> str:
    """One line for an I/O failure: the path, what happened, and what to do."""
    import errno

    path = path or exc.filename or ""
    where = f"{path}: " if path else ""
    what = exc.strerror or str(exc)
    hints = {errno.ENOSPC: "disk full; free space or write elsewhere",
             errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
             errno.EACCES: "permission denied; check the folder's permissions or choose another path",
             errno.EPERM: "operation not permitted; check the folder's permissions or choose another path",
             errno.EROFS: "read-only file system; write elsewhere",
             errno.ENOENT: "no such file or folder; check the path"}
    return f"{where}{hints.get(exc.errno, what)}"
