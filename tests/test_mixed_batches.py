"""Text-only and image batches side by side on two processes (``torchrun`` over gloo): with a
trainable encoder and connector, DDP and FSDP2 train without a hang or an unused-parameter error,
to the weights one process reaches over the same samples: each step's loss is the mean over the
step's tokens on every rank, not a mean of per-rank means. (Modality grouping keeps a step's ranks
on one modality but at its groups' edges; one sample per rank in a plain shuffle mixes them at most
steps.)"""

from __future__ import annotations

import torch
from conftest import run_config
from dist_worker import record_first_step_gradients
from safetensors.torch import load_file
from test_distributed import WORKER, component_weights, launch, torchrun

import vlm.app.stages


def stages(shapes, base_final):
    captions = {"format": "coco_captions",
                "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    text = {"format": "jsonl", "args": {"path": shapes["train"]["text"]}, "max_samples": 24}
    return {
        "base": {"train": {"vision": "full", "connector": "full", "llm": "full"}, "data": [captions],
                 "batch_size": 8, "max_steps": 1, "warmup_ratio": 0.0},
        # text-only lines and captioned images: at some steps one rank holds a batch without an
        # image while the other runs the encoder, whose weights both train
        "m": {"init_from": str(base_final), "train": {"vision": "full", "connector": "full", "llm": "lora"},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": [captions, text],
              "learning_rate": 3e-3, "batch_size": 1, "max_steps": 6, "log_every": 1, "warmup_ratio": 0.0},
    }


def test_text_only_and_image_batches_train_under_ddp_and_fsdp(tmp_path, tokenizer_dir, shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data, tmp_path / "run" / "base" / "final"))
    vlm.app.stages.run_stage(cfg, "base")
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])

    # the order really puts a text-only sample beside an image sample at some step (batch k of
    # the shuffle goes to rank k % 2)
    run = vlm.app.stages.build_stage(cfg, "m", out_dir=tmp_path / "probe")
    has_image = [bool(sample.images) for sample, _, _ in run.dataset.entries]
    run.trainer.sampler.set_epoch(0)
    order = list(run.trainer.sampler)
    assert any(has_image[order[2 * s]] != has_image[order[2 * s + 1]] for s in range(6)), "no mixed step"

    done = launch(torchrun(WORKER, "train", config, "m", str(tmp_path / "ddp"), "--record-gradients",
                           "--then", str(tmp_path / "fsdp"), "--record-gradients", "stages.m.strategy=fsdp"),
                  timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = component_weights(tmp_path / "ddp" / "m" / "final")
    fsdp = component_weights(tmp_path / "fsdp" / "m" / "final")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        assert torch.allclose(ddp[key], fsdp[key], atol=1e-5, rtol=0), (key, (ddp[key] - fsdp[key]).abs().max())
    # one process, batches of 2: step s reads order[2s] and order[2s + 1], what ranks 0 and 1 read
    one = run_config(tmp_path, tokenizer_dir, stages(shapes_data, tmp_path / "run" / "base" / "final"),
                     out_dir=tmp_path / "one", overrides=["stages.m.batch_size=2"])
    single_run = vlm.app.stages.build_stage(one, "m")
    record_first_step_gradients(single_run.trainer, tmp_path / "one_gradients.safetensors")
    single_run.trainer.train()
    # the first step's gradients: the mean over the step's tokens of both ranks, as one process's
    single_grads = load_file(str(tmp_path / "one_gradients.safetensors"))
    for run in ("ddp", "fsdp"):
        grads = load_file(str(tmp_path / run / "m" / "gradients_step_1.safetensors"))
        assert grads.keys() == single_grads.keys() and len(grads) > 10
        for key in grads:
            assert torch.allclose(grads[key], single_grads[key], atol=1e-5, rtol=0), (
                run, key, (grads[key] - single_grads[key]).abs().max())
    # and after 6 AdamW steps the weights: a mean of per-rank means ended ~1e-2 away; summation
    # order (amplified by Adam on parameters whose true gradient is 0) leaves ~2e-5
    single = component_weights(tmp_path / "one" / "m" / "final")
    assert single.keys() == ddp.keys()
    for key in ddp:
        assert torch.allclose(ddp[key], single[key], atol=5e-5, rtol=0), (key, (ddp[key] - single[key]).abs().max())
    base = load_file(str(tmp_path / "run" / "base" / "final" / "vision.safetensors"))
    assert any(not torch.equal(base[k], ddp[f"vision.{k}"]) for k in base)  # the encoder trained
