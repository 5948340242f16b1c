"""Load the official reference implementations that the metric tests compare against.

They come from PyPI wheels (``make reference-impls`` installs them, without dependencies, into
``build/reference``) and are loaded file by file, so the heavy ``lavis``/``mmf`` packages are never
imported. Nothing of them is copied into this repository.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "build" / "reference"
_FILES = {
    "vqa_eval": "lavis/common/vqa_tools/vqa_eval.py",
    "vqa": "lavis/common/vqa_tools/vqa.py",
    "m4c_evaluators": "mmf/utils/m4c_evaluators.py",
}


def load(name: str):
    """Return the official module ``name`` (a key of ``_FILES``); fail if it is not installed."""
    path = REFERENCE_DIR / _FILES[name]
    if not path.is_file():
        pytest.fail(f"official reference implementation {path} is missing: "
                    "run `make reference-impls`", pytrace=False)
    module_name = f"_reference_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]
