"""One process: the strategy key, the refusals that come before the model is built, gradient
checkpointing (same loss and gradients, and really recomputing) and fsdp in one process."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config

import vlm.app.stages
from vlm.config import ConfigError
from vlm.modeling.vlm import VisionLanguageModel
from vlm.training.strategies import accelerate_requested_processes, transformer_blocks


def stage(shapes, **extra):
    captions = {"format": "coco_captions",
                "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    return {"train": {"vision": "full", "connector": "full", "llm": "full"}, "data": [captions],
            "batch_size": 4, "max_steps": 2, "warmup_ratio": 0.0, **extra}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything builds a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")
    monkeypatch.setattr(VisionLanguageModel, "from_config", refuse)


def test_unknown_strategy_is_a_config_error(tmp_path, tokenizer_dir, shapes_data):
    with pytest.raises(ConfigError, match=r"stages\.s\.strategy: unknown strategy 'fdsp' \(did you mean 'fsdp'"):
        run_config(tmp_path, tokenizer_dir, {"s": stage(shapes_data, strategy="fdsp")})


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_without_cuda_is_refused_before_the_model_is_built(tmp_path, tokenizer_dir, shapes_data, no_model, name):
    cfg = run_config(tmp_path, tokenizer_dir, {"s": stage(shapes_data, strategy=name)})
    with pytest.raises(ConfigError) as info:
        vlm.app.stages.build_stage(cfg, "s")
    message = str(info.value)
    assert "\n" not in message and f"stages.s.strategy: '{name}'" in message
    assert ("CUDA" in message or "deepspeed" in message) and "strategy=fsdp" in message


def test_fsdp_cpu_offload_without_cuda_is_refused_before_the_model_is_built(tmp_path, tokenizer_dir, shapes_data,
                                                                             no_model):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: offloading is allowed")
    cfg = run_config(tmp_path, tokenizer_dir, {"s": stage(shapes_data, strategy="fsdp", fsdp_cpu_offload=True)})
    with pytest.raises(ConfigError, match=r"stages\.s\.fsdp_cpu_offload: .*needs CUDA"):
        vlm.app.stages.build_stage(cfg, "s")


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but no launcher started the processes"),
    ({"ACCELERATE_USE_FSDP": "true"}, "an accelerate FSDP config was given"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "an accelerate DeepSpeed config was given but stages.s.strategy is 'ddp'"),
])
def test_launch_environment_mismatches_are_refused(tmp_path, tokenizer_dir, shapes_data, no_model, monkeypatch,
                                                   env, expected):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = run_config(tmp_path, tokenizer_dir, {"s": stage(shapes_data)})
    with pytest.raises(ConfigError, match=expected) as info:
        vlm.app.stages.build_stage(cfg, "s")
    assert "\n" not in str(info.value) and ("torchrun" in str(info.value) or "zero2" in str(info.value))


def test_accelerate_num_processes_is_read_from_the_launcher_command():
    assert accelerate_requested_processes(["accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "vlm"]) == 2
    assert accelerate_requested_processes(["accelerate", "launch", "--num_processes=8", "x.py"]) == 8
    assert accelerate_requested_processes(["python", "-m", "vlm", "train"]) is None


def first_step(cfg, name):
    """Loss and gradients of the first micro-batch through the trainer's prepared module, and
    how many times the first LLM block's first sub-module ran (HF checkpoints a block's forward,
    inside its hooks, so the block's own hook runs once either way)."""
    torch.manual_seed(0)
    trainer = vlm.app.stages.build_stage(cfg, name).trainer
    calls = []
    for component in ("llm", "vision"):
        block = next(transformer_blocks(getattr(trainer._unwrapped(), component))[0].children())
        block.register_forward_hook(lambda *args, c=component: calls.append(c))
    batch = next(iter(trainer.loader))
    trainer.model.train()
    out = trainer.model(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, {c: calls.count(c) for c in ("llm", "vision")}


@pytest.mark.parametrize("modes, cache", [
    ({"vision": "full", "connector": "full", "llm": "lora"}, False),
    ({"vision": "frozen", "connector": "full", "llm": "full"}, True),
], ids=["lora-llm-full-vision", "feature-cache"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, tokenizer_dir, shapes_data, modes, cache):
    base = run_config(tmp_path, tokenizer_dir, {"base": stage(shapes_data, max_steps=1)})
    base_final = vlm.app.stages.run_stage(base, "base")
    results = []
    for checkpointing in (False, True):
        spec = stage(shapes_data, init_from=str(base_final), train=modes, feature_cache=cache,
                     gradient_checkpointing=checkpointing, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                     strategy="fsdp")  # fsdp in one process: nothing to shard, the same path as ddp
        cfg = run_config(tmp_path, tokenizer_dir, {"s": spec}, out_dir=tmp_path / f"gc_{checkpointing}")
        results.append(first_step(cfg, "s"))
    (loss, grads, calls), (gc_loss, gc_grads, gc_calls) = results
    # a checkpointed block runs again in the backward pass: the LLM's, and the vision encoder's
    # when it trains (a frozen or cached encoder is not checkpointed)
    vision_runs = 0 if cache else 1
    assert calls == {"llm": 1, "vision": vision_runs}
    assert gc_calls == {"llm": 2, "vision": 2 if modes["vision"] == "full" else vision_runs}
    assert torch.allclose(loss, gc_loss, atol=1e-6, rtol=0)
    assert grads.keys() == gc_grads.keys() and grads
    if modes["vision"] == "full":
        assert any(".vision." in n for n in grads) and any("lora_" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], gc_grads[name], atol=1e-6, rtol=0), name
