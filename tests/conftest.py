"""Shared tiny builders for the core tests: a trained tokenizer, a tiny model config and model,
small images on disk, and run configs for training tests. Nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoTokenizer

from vlm.app.wiring import load_run_config
from vlm.config import ModelConfig
from vlm.data.tokenizer_training import train_tokenizer

# the token cache (vlm/data/token_cache.py) of the tests, never the user's ~/.cache/vlm; inherited
# by the subprocesses the tests start
_TOKEN_CACHE = tempfile.TemporaryDirectory(prefix="vlm-test-cache-")  # removed when the session ends
os.environ.setdefault("VLM_CACHE_DIR", _TOKEN_CACHE.name)

SENTENCES = [
    "a small red circle in the center of the image",
    "there is a large blue square at the top left",
    "what color is the shape? red",
    "what shape is it? a green triangle",
    "where is it? in the bottom right corner",
    "describe the image briefly.",
    "the image shows a big yellow cross on a plain background",
]

# hf_clip: 32 / 8 = 4 x 4 = 16 patches, so an image is 16 placeholders with an MLP connector.
VISION_ARCH = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=4)
LLM_ARCH = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
NUM_PATCHES = 16


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved in transformers' format."""
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(SENTENCES, vocab_size=400).save_pretrained(str(folder))
    return folder


@pytest.fixture
def tokenizer(tokenizer_dir):
    """A fresh copy of the tiny tokenizer (tests may not share a mutated one)."""
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiny_model_config(tokenizer_dir, **overrides) -> Any:
    """A structured ``ModelConfig`` for the tiny hf_clip + MLP + llama model.

    ``overrides`` are dotted keys, e.g. ``{"vision.keep_cls": True, "template": "chatml"}``.
    """
    cfg = OmegaConf.structured(ModelConfig)
    cfg.vision.arch = dict(VISION_ARCH)
    cfg.vision.preprocess = "resize"
    cfg.llm.tokenizer = str(tokenizer_dir)
    cfg.llm.arch = dict(LLM_ARCH)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.fixture
def model_config(tokenizer_dir):
    return tiny_model_config(tokenizer_dir)


def build_tiny_model(model_cfg, tokenizer, seed: int = 0):
    """A randomly initialised ``VisionLanguageModel`` (fp32, eval mode), reproducible by seed."""
    from vlm.modeling.build import build_model

    torch.manual_seed(seed)
    return build_model(model_cfg, tokenizer).eval()


@pytest.fixture
def tiny_model(model_config, tokenizer):
    return build_tiny_model(model_config, tokenizer)


def write_images(folder: Path, sizes: Sequence[tuple] = ((40, 32), (32, 48), (64, 64))) -> List[str]:
    """Small PNGs of different sizes and contents; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        path = folder / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def image_paths(tmp_path) -> List[str]:
    return write_images(tmp_path / "images")


def run_config(tmp_path: Path, tokenizer_dir, stages: Dict[str, dict], out_dir: Optional[Path] = None,
               overrides: Sequence[str] = (), model: Optional[dict] = None):
    """Write a recipe YAML with the tiny model and ``stages`` and load it with ``load_run_config``."""
    model_section = {
        "vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
        "connector": {"name": "mlp2x_gelu"},
        "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)},
        "template": "plain",
    }
    for key, value in (model or {}).items():
        model_section[key] = value
    recipe = {"out_dir": str(out_dir or tmp_path / "run"), "model": model_section, "stages": stages}
    path = tmp_path / f"recipe_{len(list(tmp_path.glob('recipe_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_run_config(path, overrides=list(overrides))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Dict[str, Any]:
    """A tiny synthetic shapes dataset (16 train / 4 test images of 32 x 32)."""
    from vlm.data.synthetic import generate_shapes

    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=16, num_test=4,
                           image_size=32, progress=False)


def run_vlm(argv, capsys) -> tuple:
    """``vlm ARGV`` in this process (``vlm.app.cli.main``): ``(exit code, stdout, stderr)``."""
    from vlm.app.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def lora_instruct_model(model, seed: int = 1):
    """``model`` as an instruct stage trains it: vision and LLM frozen, LoRA (r=4) on the LLM,
    its B matrices drawn non-zero (seeded) so the adapters change the outputs."""
    from vlm.config import LoraConfig
    from vlm.training.stages import add_lora

    model.vision.requires_grad_(False)
    model.llm.requires_grad_(False)
    model.llm = add_lora(model.llm, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def answer_words_stage(split: Dict[str, str], connector: str = "frozen", llm: str = "frozen") -> dict:
    """A 12-step ``answer_words`` vision warm-up on ``split``'s VQA files (a ``shapes_data`` split)."""
    return {
        "objective": "answer_words", "train": {"vision": "full", "connector": connector, "llm": llm},
        "template": "chatml",
        "data": [{"format": "vqav2", "args": {"questions_path": split["questions"],
                                              "annotations_path": split["annotations"],
                                              "image_root": split["image_root"],
                                              "image_pattern": "{image_id:012d}.png"}}],
        "learning_rate": 3e-3, "batch_size": 16, "max_steps": 12, "log_every": 1, "seed": 0}
