"""A tiled (AnyRes) recipe end to end: prepare, two stages under a visual-token budget, evals,
then `vlm chat` and `vlm export hf-llava-next` on what it wrote."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import run_vlm
from test_cli import tiny_recipe
from transformers import LlavaNextForConditionalGeneration

from vlm.data.anyres import grids_up_to


@pytest.mark.slow  # about 2.5 minutes on 2 shared CPU cores
def test_a_tiled_recipe_trains_evaluates_chats_and_exports(tmp_path, capsys):
    out_dir = tmp_path / "run"
    recipe = tiny_recipe(out_dir)
    recipe["prepare"]["shapes"].update(image_size=64, shape_scale=0.5)
    recipe["model"]["vision"]["tiling"] = {"enabled": True, "max_tiles": 4}
    recipe["stages"]["instruct"]["max_visual_tokens"] = 60  # a 64 px image needs 88 at 2 x 2: fewer tiles
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    code, _, err = run_vlm(["run", path, "--out", out_dir], capsys)
    assert code == 0, err[-4000:]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert "accuracy" in metrics["vqa"] and all(math.isfinite(v) for v in metrics["vqa"].values())
    losses = [json.loads(line)["loss"] for line in (out_dir / "align" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) for v in losses)

    final = out_dir / "instruct" / "final"
    image = next((out_dir / "data" / "images" / "test").glob("*.png"))
    code, out, err = run_vlm(["chat", final, "--image", image, "--prompt", "what color is the shape?"], capsys)
    assert code == 0 and out.strip(), err[-2000:]

    code, out, err = run_vlm(["export", "hf-llava-next", final, "--out", tmp_path / "hf"], capsys)
    assert code == 0, err[-2000:]
    model = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    assert model.config.image_grid_pinpoints == grids_up_to(4, 32)
