"""``stages.<name>.compile: true``: the repeated blocks train compiled (inductor, dynamic shapes)
and give the eager run's losses and weights to a stated tolerance; packed rows of varying length
reuse the compiled graphs; the blocks are eager again afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

import vlm.app.stages
from vlm.training.callbacks import Callback
from vlm.training.compile import compile_repeated_blocks, restore_eager

pytestmark = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")


def _stage(shapes, compile_: bool, precision: str = "fp32") -> dict:
    return {"train": {"vision": "frozen", "connector": "full", "llm": "full"},
            "data": [{"format": "llava_json", "args": {"path": shapes["train"]["conversations"],
                                                      "image_root": shapes["train"]["image_root"]}}],
            "learning_rate": 1e-3, "batch_size": 4, "max_steps": 4, "log_every": 1, "packing": True,
            "precision": precision, "compile": compile_}


class Lengths(Callback):
    """Records each step's packed row length and whether the LLM's layers were compiled."""

    def __init__(self):
        self.compiled = []

    def on_step_end(self, ctx, position):
        layers = ctx.model().llm.get_decoder().layers
        self.compiled.append(all(layer._compiled_call_impl is not None for layer in layers))


def _run(tmp_path, tokenizer_dir, shapes, compile_: bool, name: str, precision: str = "fp32"):
    cfg = run_config(tmp_path, tokenizer_dir, {name: _stage(shapes, compile_, precision)},
                     out_dir=tmp_path / name, model={"template": "chatml"})
    seen = Lengths()
    run = vlm.app.stages.build_stage(cfg, name, callbacks=[seen])
    final = run.trainer.train()
    losses = [json.loads(line)["loss"] for line in (Path(cfg.out_dir) / name / "metrics.jsonl").read_text().splitlines()]
    return run.trainer, final, losses, seen


def test_compiled_training_matches_eager_training(tmp_path, tokenizer_dir, shapes_data):
    import torch._dynamo

    torch._dynamo.reset()
    _, eager_final, eager_losses, _ = _run(tmp_path, tokenizer_dir, shapes_data, False, "plain")
    trainer, compiled_final, compiled_losses, seen = _run(tmp_path, tokenizer_dir, shapes_data, True, "compiled")
    assert len(compiled_losses) == 4
    # inductor's fused kernels sum in another order: fp32 to 1e-4 over four optimizer steps
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), atol=1e-4, rtol=0)
    a, b = load_file(str(eager_final / "llm.safetensors")), load_file(str(compiled_final / "llm.safetensors"))
    assert a.keys() == b.keys()  # compiling leaves the state-dict names alone
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-3)
    assert seen.compiled == [True] * 4  # the steps ran compiled (callbacks run eager, but the blocks stay)
    layers = trainer._unwrapped().llm.get_decoder().layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # eager again after training


def test_only_the_outermost_repeated_blocks_compile(tiny_model):
    blocks = compile_repeated_blocks(tiny_model)
    try:
        layers = list(tiny_model.llm.get_decoder().layers) + list(tiny_model.vision.model.encoder.layers)
        assert {id(b) for b in blocks} == {id(layer) for layer in layers}
        batch = torch.randint(0, 50, (2, 7))
        with torch.no_grad():
            compiled = tiny_model.llm(input_ids=batch).logits
        restore_eager(blocks)
        with torch.no_grad():
            plain = tiny_model.llm(input_ids=batch).logits
        torch.testing.assert_close(compiled, plain, atol=1e-5, rtol=1e-5)
    finally:
        restore_eager(blocks)


@pytest.mark.slow  # compiles a second set of graphs (~15 s on one core)
def test_compiled_bf16_training_tracks_eager_bf16(tmp_path, tokenizer_dir, shapes_data):
    """bf16 autocast through the compiled blocks (with the training attention and the
    frozen-weight cast): the losses track eager bf16 to bf16 precision."""
    _, _, eager_losses, _ = _run(tmp_path, tokenizer_dir, shapes_data, False, "plain16", "bf16")
    _, _, compiled_losses, seen = _run(tmp_path, tokenizer_dir, shapes_data, True, "compiled16", "bf16")
    assert seen.compiled == [True] * 4
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), atol=2e-2, rtol=0)
