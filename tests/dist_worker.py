"""A training / evaluation entry point for the multi-process tests, started by ``torchrun``.

``python tests/dist_worker.py train CONFIG STAGE OUT [--kill-after-step N] [override ...]
[--then OUT ...]`` trains ``STAGE`` of ``CONFIG`` under ``OUT`` as ``vlm train`` does, and writes each rank's own
window losses to ``OUT/STAGE/rank_losses_<rank>.jsonl`` (what the logged rank means are checked
against). ``--kill-after-step N``: every rank SIGKILLs itself after step N (a crash, not an exit);
``--sleep-after-step N R S``: rank R sleeps S seconds after step N (a stalled process).
``--record-gradients``: rank 0 writes the gradients the first optimizer step reads (whole, after
the reduction across ranks and the clipping) to ``OUT/STAGE/gradients_step_1.safetensors``.
``--resume``: continue from the latest checkpoint. Each rank writes the labelled token ids of every
row it trained on, per step, to ``OUT/STAGE/rank_rows_<rank>.jsonl`` (which samples it saw).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from vlm.app.stages import build_stage
from vlm.app.wiring import load_run_config as load_config
from vlm.training.callbacks import Callback


class RankLosses(Callback):
    """Keeps this rank's sample-weighted loss per logging window."""

    def __init__(self, path: Path):
        self.path = path
        self.window = [0.0, 0]

    def forward_hook(self, module, args, out):
        n = args[0].input_ids.shape[0]
        self.window[0] += float(out.loss.detach()) * n
        self.window[1] += n

    def on_log(self, ctx, record):
        if "loss" not in record:  # an evaluation record: no training window ended
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": record["step"], "loss": self.window[0] / self.window[1],
                                "samples": self.window[1]}) + "\n")
        self.window = [0.0, 0]


class RankRows(Callback):
    """Writes the labelled token ids of each row this rank trained on, per optimizer step."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = []

    def forward_hook(self, module, args, out):
        for row in args[0].labels.tolist():
            self.rows.append([t for t in row if t != -100])

    def on_step_end(self, ctx, position):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": position["step"], "rows": self.rows}) + "\n")
        self.rows = []


class KillAfter(Callback):
    """SIGKILL this process once step ``step`` has finished."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, position):
        if position["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SleepAfter(Callback):
    """Rank ``rank`` sleeps ``seconds`` once step ``step`` has finished (a stalled process)."""

    def __init__(self, step: int, rank: int, seconds: float):
        self.step, self.rank, self.seconds = step, rank, seconds

    def on_step_end(self, ctx, position):
        if position["step"] == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            time.sleep(self.seconds)


def record_first_step_gradients(trainer, path: Path) -> None:
    """Wrap ``trainer``'s optimizer so that its first step writes the gradients it reads, by
    parameter name (a sharded gradient gathered whole on every rank; rank 0 writes)."""
    from safetensors.torch import save_file

    optimizer, step = trainer.optimizer, trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = {}
        for name, parameter in trainer.model.named_parameters():
            if parameter.grad is not None:
                grad = parameter.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                grads[name.removeprefix("module.")] = grad.detach().clone().contiguous()
        if int(os.environ.get("RANK", "0")) == 0:
            save_file(grads, str(path))
        optimizer.step = step
        return step(*args, **kwargs)

    optimizer.step = recording_step


def train(argv) -> None:
    """``CONFIG STAGE OUT [--kill-after-step N] [override ...] [--then OUT [...] ...]``: one run per
    ``--then``-separated part, in this launch (one process group for all)."""
    config, stage, *rest = argv
    parts, part = [], []
    for arg in rest:
        if arg == "--then":
            parts.append(part)
            part = []
        else:
            part.append(arg)
    for out, *overrides in parts + [part]:
        run_one(config, stage, out, overrides)


def run_one(config: str, stage: str, out: str, rest) -> None:
    kill, sleep, resume = None, None, False
    if rest[:1] == ["--resume"]:
        resume, rest = True, rest[1:]
    if rest[:1] == ["--kill-after-step"]:
        kill, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--sleep-after-step"]:  # STEP RANK SECONDS
        sleep, rest = SleepAfter(int(rest[1]), int(rest[2]), float(rest[3])), rest[4:]
    record = rest[:1] == ["--record-gradients"]
    rest = rest[1:] if record else rest
    cfg = load_config(config, rest, out_dir=out)
    rank = int(os.environ.get("RANK", "0"))
    folder = Path(out) / stage
    folder.mkdir(parents=True, exist_ok=True)
    losses = RankLosses(folder / f"rank_losses_{rank}.jsonl")
    rows = RankRows(folder / f"rank_rows_{rank}.jsonl")
    callbacks = [losses, rows] + ([KillAfter(kill)] if kill else []) + ([sleep] if sleep else [])
    run = build_stage(cfg, stage, callbacks=callbacks)
    run.trainer.model.register_forward_hook(losses.forward_hook)
    run.trainer.model.register_forward_hook(rows.forward_hook)
    if record:
        record_first_step_gradients(run.trainer, folder / "gradients_step_1.safetensors")
    run.trainer.train(resume=resume)


if __name__ == "__main__":
    {"train": train}[sys.argv[1]](sys.argv[2:])
