"""Step timing shared by the training benchmarks: per-step marks, samples/s per wall and CPU second."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Sequence

from vlm.training.callbacks import Callback


class StepTimer(Callback):
    """Marks wall-clock and this process's CPU time after every optimizer step."""

    def __init__(self):
        self.marks: List[tuple] = []

    def on_step_end(self, ctx, position):
        self.marks.append((time.perf_counter(), time.process_time()))


def timed_train(trainer, timer: StepTimer, warmup: int) -> Dict[str, float]:
    """Run ``trainer`` (which calls ``timer``) and measure the optimizer steps after the first
    ``warmup``: wall-clock and this process's CPU time (the latter barely moves when other jobs
    share the machine)."""
    trainer.train()
    marks = timer.marks
    samples = sum(r["samples"] for r in trainer.history if r["step"] > warmup)
    wall = marks[-1][0] - marks[warmup - 1][0]
    cpu = marks[-1][1] - marks[warmup - 1][1]
    return {"samples": samples, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
            "samples_per_s": round(samples / wall, 2), "samples_per_cpu_s": round(samples / cpu, 2)}


def medians(runs: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Median samples/s (wall and per CPU second) over repeated :func:`timed_train` runs."""
    return {key: statistics.median(r[key] for r in runs) for key in ("samples_per_s", "samples_per_cpu_s")}
