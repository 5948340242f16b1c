"""Checkpoint files: model.yaml is written resolved and loads back on its own."""

from __future__ import annotations

import torch
import yaml
from conftest import LLM_ARCH, VISION_ARCH, build_tiny_model

from vlm.app.wiring import load_run_config
from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import train_modes
from vlm.modeling.llm import load_tokenizer


def test_model_yaml_is_resolved_and_rebuilds_the_model(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("VLM_TEST_TEMPLATE", "chatml")
    recipe = {
        "out_dir": str(tmp_path / "run"),
        "prepare": {"tokenizer": {"out": str(tokenizer_dir)}},
        "model": {"vision": {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize"},
                  "llm": {"tokenizer": "${prepare.tokenizer.out}", "arch": dict(LLM_ARCH)},
                  "template": "${oc.env:VLM_TEST_TEMPLATE}"},
        "stages": {"align": {"data": [{"format": "jsonl", "args": {"path": "${out_dir}/text.jsonl"}}]}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cfg = load_run_config(path)
    assert "${" in yaml.safe_dump(recipe["model"])  # the recipe does interpolate

    tokenizer = load_tokenizer(cfg.model.llm, cfg.model.image_token)
    model = build_tiny_model(cfg.model, tokenizer)
    folder = tmp_path / "final"
    folder.mkdir()
    save_model_state(model, folder, train_modes(cfg.stages.align.train), cfg.model, tokenizer, prior=None)

    text = (folder / "model.yaml").read_text()
    assert "${" not in text
    saved = yaml.safe_load(text)
    assert saved["llm"]["tokenizer"] == str(tokenizer_dir)
    assert saved["template"] == "chatml"

    monkeypatch.delenv("VLM_TEST_TEMPLATE")  # the folder must not depend on the environment
    rebuilt, _, model_cfg = load_pretrained(folder)
    assert model_cfg.template == "chatml"
    original, again = model.state_dict(), rebuilt.state_dict()
    assert original.keys() == again.keys() and original
    for name, value in original.items():
        assert torch.equal(value, again[name]), name
