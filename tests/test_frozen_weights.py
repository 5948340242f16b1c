"""Frozen weights pre-cast to the autocast dtype give bitwise the autocast step's loss and
gradients, leave tied and trainable parameters alone, and are fp32 again for checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import lora_instruct_model, run_config
from safetensors.torch import load_file

import vlm.app.stages
from vlm.training.frozen_weights import FrozenWeightCast
from vlm.training.trainer import Trainer


def _lora_model(tiny_model):
    return lora_instruct_model(tiny_model)


def test_the_cast_copy_gives_the_autocast_step_bitwise(tiny_model):
    model = _lora_model(tiny_model).train()
    casts = FrozenWeightCast(model, torch.bfloat16)
    cast_ids = {id(p) for p, _, _ in casts.entries}
    embeddings = model.llm.get_input_embeddings().weight
    assert id(embeddings) not in cast_ids  # not cast by autocast: stays fp32 (and so does a tied head)
    assert not any(p.requires_grad for p, _, _ in casts.entries)
    assert any(p is model.vision.model.embeddings.patch_embedding.weight for p, _, _ in casts.entries)
    assert len(casts) > 10
    ids = torch.randint(0, 50, (3, 12))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.llm(input_ids=ids, labels=ids).loss
            features = model.vision(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
            loss = hidden + features.float().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = step()
    fp32 = [p.data for p, _, _ in casts.entries]
    casts.to_low()
    assert all(p.dtype == torch.bfloat16 for p, _, _ in casts.entries)
    low_loss, low_grads = step()
    assert torch.equal(low_loss, plain_loss)
    assert plain_grads.keys() == low_grads.keys() and any("lora" in n for n in plain_grads)
    for name in plain_grads:
        assert torch.equal(low_grads[name], plain_grads[name]), name
    with casts.full_precision():
        assert all(p.data_ptr() == t.data_ptr() and p.dtype == torch.float32 for (p, _, _), t in zip(casts.entries, fp32))
    assert all(p.dtype == torch.bfloat16 for p, _, _ in casts.entries)
    casts.to_full()
    assert all(p.data_ptr() == t.data_ptr() and p.dtype == torch.float32 for (p, _, _), t in zip(casts.entries, fp32))


def test_a_weight_tied_to_an_embedding_is_not_cast():
    embedding, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # a tied LM head: the embedding lookup must stay fp32
    other = torch.nn.Linear(4, 4)
    model = torch.nn.ModuleDict({"embedding": embedding, "head": head, "other": other}).requires_grad_(False)
    casts = FrozenWeightCast(model, torch.bfloat16)
    assert {id(p) for p, _, _ in casts.entries} == {id(other.weight), id(other.bias)}


def _stage(shapes) -> dict:
    return {"train": {"vision": "frozen", "connector": "full", "llm": "full"},
            "data": [{"format": "llava_json", "args": {"path": shapes["train"]["conversations"],
                                                      "image_root": shapes["train"]["image_root"]}}],
            "learning_rate": 1e-3, "batch_size": 4, "max_steps": 3, "log_every": 1, "save_every": 2,
            "packing": True, "precision": "bf16"}


def test_a_bf16_stage_trains_the_same_with_and_without_the_cast(tmp_path, tokenizer_dir, shapes_data, monkeypatch):
    """The vision encoder is frozen (cast); the trained LLM and connector are not."""
    results = {}
    for name, enabled in (("cast", True), ("plain", False)):
        if not enabled:
            monkeypatch.setattr(Trainer, "_frozen_weight_cast", lambda self: None)
        cfg = run_config(tmp_path, tokenizer_dir, {name: _stage(shapes_data)}, out_dir=tmp_path / name,
                         model={"template": "chatml"})
        run = vlm.app.stages.build_stage(cfg, name)
        final = run.trainer.train()
        model = run.trainer._unwrapped()
        assert model.vision.model.embeddings.patch_embedding.weight.dtype == torch.float32  # restored
        losses = [json.loads(line)["loss"] for line in (Path(cfg.out_dir) / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = (losses, load_file(str(final / "llm.safetensors")),
                         load_file(str(Path(cfg.out_dir) / name / "checkpoints" / "step_0000002" / "connector.safetensors")))
    (cast_losses, cast_llm, cast_conn), (plain_losses, plain_llm, plain_conn) = results["cast"], results["plain"]
    assert cast_losses == plain_losses and len(cast_losses) == 3
    for a, b in ((cast_llm, plain_llm), (cast_conn, plain_conn)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
