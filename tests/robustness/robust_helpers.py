"""Shared helpers of the robustness suite: a tiny project on disk (shapes data, a recipe), the
``vlm`` command run in this process, and snapshots that show nothing was lost or changed."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import yaml
from conftest import LLM_ARCH, VISION_ARCH, run_vlm  # noqa: F401  (run_vlm re-exported)


def error_line(err: str) -> str:
    """The single ``error: ...`` line of stderr; fails if there is none, several, or a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def snapshot(folder: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (empty when it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Project:
    """A copy of the tiny shapes data and a recipe over it, in ``root``; ``recipe`` is a dict
    to edit before :meth:`write`."""

    def __init__(self, root: Path, shapes: dict, tokenizer_dir: Path):
        self.root = Path(root)
        self.data = self.root / "data"
        shutil.copytree(shapes["out_dir"], self.data)
        rel = lambda p: str(self.data / Path(p).relative_to(shapes["out_dir"]))  # noqa: E731
        self.train = {k: rel(v) for k, v in shapes["train"].items() if k != "image_pattern"}
        self.test = {k: rel(v) for k, v in shapes["test"].items() if k != "image_pattern"}
        self.out = self.root / "out"
        self.recipe = {
            "out_dir": str(self.out),
            "model": {
                "vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
                "connector": {"name": "mlp2x_gelu"},
                "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)},
                "template": "plain",
            },
            "stages": {
                "align": {
                    "train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                    "data": [{"format": "coco_captions",
                              "args": {"path": self.train["captions"], "image_root": self.train["image_root"]}}],
                    "learning_rate": 1e-3, "batch_size": 4, "max_steps": 2, "log_every": 1,
                    "warmup_ratio": 0.0,
                },
            },
            "evals": {
                "caption": {"task": "caption", "max_new_tokens": 2, "batch_size": 4,
                            "data": {"format": "coco_captions",
                                     "args": {"path": self.test["captions"], "image_root": self.test["image_root"]}}},
            },
        }

    def stage(self, name: str = "align") -> dict:
        return self.recipe["stages"][name]

    def write(self, name: str = "recipe.yaml", recipe: Optional[dict] = None) -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(copy.deepcopy(recipe or self.recipe), sort_keys=False))
        return path

    def images(self, split: str = "train") -> List[Path]:
        return sorted(Path((self.train if split == "train" else self.test)["image_root"]).glob("*.png"))
