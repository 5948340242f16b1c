"""The tracker interface: what a tracker run is built from and the calls it answers."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Mapping, Optional

from vlm.core.errors import ConfigError


@dataclass
class TrackerContext:
    """What a tracker run is built for.

    ``folder``: where its files go (the stage's output folder, or ``OUT/eval``); ``run_dir``: the
    run's ``out_dir``; ``stage``: the stage name (``eval`` for final evaluations); ``run_name``
    and ``project`` (``tracking:``); ``run_id``: vlm's id of this tracker run, the same on a
    resume; ``resume_step``: the step a resumed stage continues after (None: a fresh run);
    ``stored``: what this tracker saved of the run before (:meth:`Tracker.state`), on a resume.
    """

    folder: Path
    run_dir: Path
    stage: str
    run_name: str
    project: str
    run_id: str
    resume_step: Optional[int] = None
    stored: Dict[str, Any] = field(default_factory=dict)

    @property
    def display_name(self) -> str:
        """The tracker run's name: ``<run name>/<stage>``."""
        return f"{self.run_name}/{self.stage}"


class Tracker:
    """One tracker run. Subclasses implement :meth:`log` and may override the rest; ``build``
    returns one (None: the tracker has nothing to do in-process, as ``jsonl``)."""

    Options: ClassVar[Optional[type]] = None
    package: ClassVar[Optional[str]] = None  # the optional dependency it imports, named when missing

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: TrackerContext) -> Optional["Tracker"]:
        """A tracker run for ``ctx``."""
        return cls(ctx)

    @classmethod
    def check(cls, cfg, where: str) -> None:
        """Its package must be installed: ConfigError naming ``where`` and the package (found, not
        imported: checking a config stays cheap)."""
        if cls.package is not None and importlib.util.find_spec(cls.package) is None:
            raise ConfigError(missing_package(cls.package, where))

    def __init__(self, ctx: TrackerContext):
        self.ctx = ctx

    def log(self, metrics: Dict[str, float], step: int) -> None:
        """Scalar ``metrics`` at training step ``step``."""
        raise NotImplementedError

    def log_config(self, config: Dict[str, Any]) -> None:
        """The resolved run config as hyperparameters (a fresh run only)."""

    def state(self) -> Dict[str, Any]:
        """What a resumed run needs to continue this tracker run (JSON)."""
        return {}

    def flush(self) -> None:
        """Write what is buffered (after a checkpoint)."""

    def close(self, status: str = "finished") -> None:
        """End the tracker run (``finished``, ``failed`` or ``preempted``)."""


def missing_package(package: str, where: str) -> str:
    """The one-line error for a tracker whose package is not installed."""
    pip = {"mlflow": "mlflow-skinny"}.get(package, package)
    return (f"{where}: the '{package}' tracker needs the {pip} package: pip install 'vlm[track]' "
            f"(or pip install {pip})")


def require(package: str, where: str = "report_to"):
    """Import ``package`` (an optional dependency), or ConfigError naming it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(missing_package(package, where)) from None


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested mapping as ``{"a.b.c": value}``; lists and None become their JSON-ish text."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
