"""Peak CPU memory of one training step with and without gradient checkpointing.

    python scripts/checkpointing_memory.py            # both settings, each in a fresh process
    python scripts/checkpointing_memory.py --one on   # one setting (what the driver runs)

A LLaMA-style LLM built from an inline config (no download), fp32, one forward + backward of
``--batch`` x ``--seq`` tokens, checkpointing switched on by vlm's own
``vlm.training.strategies`` helper. Reported: the process's peak resident set (ru_maxrss) above
what it held after building the model and its gradients' buffers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one(setting: str, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.training.strategies import _enable_module_checkpointing

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=4096, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).train()
    if setting == "on":
        _enable_module_checkpointing(model, "llm")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    for p in model.parameters():  # allocate the gradient buffers before the baseline
        p.grad = torch.zeros_like(p)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in model.parameters())
    return {"checkpointing": setting, "params_M": round(params / 1e6, 1), "tokens": args.batch * args.seq,
            "step_peak_MiB": round((peak - base) / 1024, 1), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=["on", "off"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    rows = []
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--one", setting, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    for row in rows:
        print(json.dumps(row))
    print(f"peak step memory: {rows[0]['step_peak_MiB']:.0f} MiB without, {rows[1]['step_peak_MiB']:.0f} MiB with "
          f"checkpointing ({rows[1]['step_peak_MiB'] / rows[0]['step_peak_MiB']:.2f}x); "
          f"same loss: {rows[0]['loss'] == rows[1]['loss']}")


if __name__ == "__main__":
    main()
