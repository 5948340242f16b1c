"""``vlm bench feature-cache``: training samples/s with the encoder running vs from the cache.

``feature-cache``: train one stage of a recipe for N steps with its frozen encoder running and N
steps from the frozen-feature cache, in one process, in turn a few times, and compare samples/s.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig

from vlm.app.bench.timing import StepTimer, medians, timed_train
from vlm.app.wiring import validate
from vlm.config import ConfigError


def bench_feature_cache(cfg: DictConfig, stage_name: str = "align", steps: int = 30, warmup: int = 3,
                        repeats: int = 3, work_dir: Optional[str | Path] = None, prepare: bool = False) -> dict:
    """Train ``stage_name`` for ``warmup + steps`` steps with the encoder running, then from the
    feature cache, ``repeats`` times in turn, and return samples/s of each over the last
    ``steps`` steps (median over the repeats, wall-clock and per CPU second) and their ratios.

    The cache is built from cold before the first cached run (timed on its own); later cached
    runs find it complete. The model is built from ``cfg.model`` without the stage's
    ``init_from`` (throughput does not depend on the weights). ``prepare`` runs the recipe's
    prepare step first (the demo's data). Everything is written under ``work_dir`` (default
    ``<out_dir>/bench_feature_cache``).
    """
    from vlm.app.recipes import run_prepare
    from vlm.app.stages import build_stage

    if stage_name not in cfg.stages:
        raise ConfigError(f"--stage: no stage '{stage_name}'; stages: {list(cfg.stages)}")
    if warmup < 1 or steps < 1 or repeats < 1:
        raise ConfigError("--warmup, --steps and --repeats must be at least 1")
    work = Path(work_dir) if work_dir else Path(cfg.out_dir) / "bench_feature_cache"
    cache_root = work / "feature_cache"
    shutil.rmtree(cache_root, ignore_errors=True)  # the first build is timed from cold
    if prepare:
        run_prepare(cfg)
    base = cfg.stages[stage_name]
    result: dict = {"stage": stage_name, "steps": steps, "warmup_steps": warmup, "repeats": repeats,
                    "batch_size": base.batch_size * base.grad_accum, "torch_threads": torch.get_num_threads()}
    runs: Dict[str, List[dict]] = {"encoder": [], "cache": []}
    builds: List[dict] = []
    for _ in range(repeats):
        for mode in ("encoder", "cache"):
            run_cfg = copy.deepcopy(cfg)
            stage = run_cfg.stages[stage_name]
            stage.feature_cache = mode == "cache"
            stage.feature_cache_dir = str(cache_root)
            stage.max_steps = warmup + steps
            stage.save_every = None
            stage.log_every = 1
            validate(run_cfg)
            timer = StepTimer()
            run = build_stage(run_cfg, stage_name, out_dir=work / mode, load_init=False, callbacks=[timer])
            result["device"] = str(run.trainer.accelerator.device)
            runs[mode].append(timed_train(run.trainer, timer, warmup))
            if run.feature_cache is not None:
                report = run.feature_cache
                builds.append({"seconds": round(report.seconds, 3), "images": report.images,
                               "computed": report.computed, "reused": report.reused})
            del run
    for mode, measured in runs.items():
        result[mode] = medians(measured)
        result[mode]["runs"] = measured
    result["cache"]["build_s"] = builds[0]["seconds"]
    result["cache"]["builds"] = builds
    result["speedup"] = round(result["cache"]["samples_per_s"] / result["encoder"]["samples_per_s"], 3)
    result["speedup_cpu"] = round(result["cache"]["samples_per_cpu_s"] / result["encoder"]["samples_per_cpu_s"], 3)
    return result
