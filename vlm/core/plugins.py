"""Plugin modules: imported so that they register components; recorded beside stage outputs.

Plugin modules: imported so that their imports register components (a run config's
``plugins:``, the ``vlm.plugins`` entry points), recorded beside a stage output and, with the
user's consent, imported again to rebuild its model.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from vlm.core.errors import CheckpointError, ConfigError
from vlm.core.registry import load_entry_point_plugins


def load_plugins(modules: Sequence[str], where: str = "plugins") -> None:
    """Import each plugin module (its import registers its components), and the installed
    packages' ``vlm.plugins`` entry points."""
    load_entry_point_plugins()
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{where}.{i}: cannot import plugin module '{name}': {exc}") from None


PLUGINS_FILE = "plugins.json"


def save_plugins(folder: str | Path, modules: Sequence[str]) -> None:
    """Record the plugin modules a stage output's components come from (nothing when none)."""
    if modules:
        (Path(folder) / PLUGINS_FILE).write_text(json.dumps(list(modules)))


PLUGINS_ENV = "VLM_PLUGINS"


def load_saved_plugins(folder: str | Path) -> None:
    """Make the plugin modules a stage output recorded (:func:`save_plugins`) available, so that
    its model can be rebuilt in a process that did not load its run config.

    A checkpoint names modules; it never decides which code runs. A recorded module is imported
    only when the user allowed it: already imported, or listed in the ``VLM_PLUGINS``
    environment variable (comma-separated). Otherwise a CheckpointError names the modules."""
    path = Path(folder) / PLUGINS_FILE
    if not path.is_file():
        return
    recorded = [str(m) for m in json.loads(path.read_text())]
    allowed = {m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()}
    refused = [m for m in recorded if m not in sys.modules and m not in allowed]
    if refused:
        raise CheckpointError(f"{path}: this model's components come from plugin module(s) {', '.join(refused)}; "
                              "vlm does not import code a checkpoint names: if you trust them, set "
                              f"{PLUGINS_ENV}={','.join(refused)} (or import them yourself)")
    load_plugins(recorded, where=str(path))
