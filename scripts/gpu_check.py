"""Throughput and peak memory of one training stage per strategy, on a model built from an inline
config (no download). Run by scripts/gpu_check.sh; one strategy per process:

    torchrun --nproc_per_node 1 scripts/gpu_check.py --strategy fsdp --out runs/gpu_check [--size 1b|tiny]

``1b``: a CLIP ViT-B/16-shaped encoder (frozen) + MLP connector + a 1.1B LLaMA (TinyLlama shape,
trained fully), bf16, 336-token prompts (196 image tokens + text), batch 8. ``tiny``: the same
pipeline at test size, fp32 (a CPU sanity check of this script). Prints one JSON line: tokens/s
(non-padding tokens through the model per second, after ``--warmup`` steps) and the peak memory
(CUDA allocator peak; on CPU the process's peak resident set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

SIZES = {
    "1b": {"vision": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12),
           "llm": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
           "image_size": 224, "batch_size": 8, "precision": "bf16"},
    "tiny": {"vision": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4),
             "llm": dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
             "image_size": 32, "batch_size": 4, "precision": "fp32"},
}


def recipe(size: str, out: Path, strategy: str, checkpointing: bool, steps: int) -> dict:
    spec = SIZES[size]
    data = out / "data"
    return {
        "out_dir": str(out / f"{strategy}_gc{int(checkpointing)}"),
        "prepare": {"shapes": {"out": str(data), "num_train": 256, "num_test": 8, "image_size": spec["image_size"]},
                    "tokenizer": {"out": str(out / "tokenizer"), "files": [str(data / "text_train.jsonl")],
                                  "vocab_size": 600}},
        "model": {"vision": {"name": "hf_clip", "arch": spec["vision"], "preprocess": "resize"},
                  "connector": {"name": "mlp2x_gelu"},
                  "llm": {"tokenizer": str(out / "tokenizer"), "arch": spec["llm"]},
                  "template": "chatml"},
        "stages": {"check": {
            "train": {"vision": "frozen", "connector": "full", "llm": "full"},
            "data": [{"format": "llava_json", "args": {"path": str(data / "conversations_train.json"),
                                                       "image_root": str(data / "images" / "train")}}],
            "batch_size": spec["batch_size"], "max_steps": steps, "log_every": steps, "warmup_ratio": 0.0,
            "learning_rate": 1e-5, "precision": spec["precision"], "strategy": strategy,
            "gradient_checkpointing": checkpointing, "max_length": 512}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp", "zero2", "zero3"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--size", default="1b", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="runs/gpu_check")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from vlm.app.recipes import run_prepare
    from vlm.app.stages import build_stage
    from vlm.config import RunConfig, validate
    from vlm.training.callbacks import Callback

    out = Path(args.out)
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig),
                          recipe(args.size, out, args.strategy, args.gradient_checkpointing, args.steps))
    validate(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and not (out / "tokenizer").is_dir():
        run_prepare(cfg)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

    class Clock(Callback):
        """Tokens and time after the warm-up steps."""

        def __init__(self):
            self.tokens, self.start, self.counting = 0, None, False

        def hook(self, module, inputs, output):
            if self.counting:
                self.tokens += int(inputs[0]["attention_mask"].sum())

        def on_step_end(self, ctx, position):
            if position["step"] == args.warmup:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start, self.counting = time.perf_counter(), True

    clock = Clock()
    run = build_stage(cfg, "check", callbacks=[clock])
    run.trainer.model.register_forward_hook(clock.hook)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run.trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    elapsed = time.perf_counter() - clock.start
    params = sum(p.numel() for p in run.trainer.model.parameters())
    if run.trainer.is_main:
        print(json.dumps({"strategy": args.strategy, "gradient_checkpointing": args.gradient_checkpointing,
                          "size": args.size, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "params_M_local": round(params / 1e6, 1), "tokens_per_s": round(clock.tokens / elapsed, 1),
                          "peak_memory_GiB": round(peak, 2), "steps_timed": args.steps - args.warmup}), flush=True)


if __name__ == "__main__":
    main()
