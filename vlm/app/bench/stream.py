"""``vlm bench stream``: training samples/s streamed vs map-style, and resident memory by data size.

Throughput: one stage trained ``warmup + steps`` optimizer steps from its own (map-style) data and
``warmup + steps`` from the same samples as webdataset shards (``--shards``, or converted with
``vlm data convert``'s code into the work folder), in one process, in turn, ``repeats`` times;
samples/s of the last ``steps`` steps per wall second and per CPU second, medians, and the ratio
streamed / map-style.

Memory: for each size K of ``memory_sizes``, a fresh process (so the peaks do not mix; they run at
once) trains the stage the same number of steps streamed over the shards' first K samples and
reports its peak resident memory (``VmHWM``: the training process; ``ru_maxrss``: the largest
process it started, its DataLoader workers when it has some; its log in ``memory_K.log``); the
ratio is the largest size's peak over the smallest's. The model is built from ``cfg.model`` without
``init_from``: neither figure depends on the weights.
"""

from __future__ import annotations

import copy
import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from vlm.app.bench.timing import StepTimer, medians, timed_train
from vlm.app.env import environment
from vlm.app.wiring import load_run_config, validate
from vlm.config import DataConfig
from vlm.core.errors import ConfigError, DataFormatError, TrainingError

MODES = ("map", "stream")


def shards_entry(pattern: str, max_samples: Optional[int] = None) -> DataConfig:
    """The dataset entry that streams the webdataset shards ``pattern`` names."""
    return DataConfig(format="webdataset", args={"shards": pattern}, max_samples=max_samples)


def shards_samples(pattern: str) -> int:
    """How many samples the shards ``pattern`` names hold; one ConfigError naming ``--shards``."""
    from vlm.data.formats import source_shards

    try:
        return sum(shard.count for shard in source_shards("webdataset", {"shards": pattern}))
    except (ConfigError, DataFormatError) as exc:
        raise ConfigError(f"--shards {pattern!r}: {exc}") from None


def _stage_cfg(cfg: DictConfig, stage_name: str, max_steps: int, data: Optional[List[DataConfig]] = None) -> DictConfig:
    """A copy of ``cfg`` whose stage ``stage_name`` trains ``max_steps`` steps, logs every step,
    saves no checkpoint and, given ``data``, reads that instead of its own."""
    run_cfg = copy.deepcopy(cfg)
    stage = run_cfg.stages[stage_name]
    if data is not None:
        stage.data = data
    stage.max_steps = max_steps
    stage.save_every = None
    stage.log_every = 1
    validate(run_cfg)
    return run_cfg


def _convert(cfg: DictConfig, stage_name: str, out: Path, shard_size: int) -> str:
    """The stage's data written as webdataset shards under ``out`` (``vlm data convert``); their pattern."""
    from vlm.data.convert import convert_stage, reader_entry

    shutil.rmtree(out, ignore_errors=True)
    manifest = convert_stage(cfg.stages[stage_name].data, cfg.model.image_token, out, "webdataset", shard_size,
                             progress=False)
    return reader_entry(manifest, out)["args"]["shards"]


def _memory_sizes(sizes: Sequence[int], available: int, pattern: str) -> List[int]:
    sizes = sorted(set(int(k) for k in sizes))
    if any(k < 1 for k in sizes):
        raise ConfigError(f"--memory-sizes {sizes}: each size must be at least 1")
    if sizes and sizes[-1] > available:
        raise ConfigError(f"--memory-sizes: {sizes[-1]} samples asked, the shards {pattern!r} hold {available}")
    return sizes


def bench_stream(cfg: DictConfig, stage_name: str, shards: Optional[str] = None, steps: int = 30, warmup: int = 3,
                 repeats: int = 3, memory_sizes: Sequence[int] = (20000, 200000), shard_size: int = 1000,
                 work_dir: Optional[str | Path] = None, prepare: bool = False) -> dict:
    """Train ``stage_name`` from its own data and streamed from webdataset shards in turn and
    measure each process's peak memory streaming ``memory_sizes`` samples (module docstring);
    ``prepare`` runs the recipe's prepare step first (its data); everything is written under
    ``work_dir`` (default ``<out_dir>/bench_stream``)."""
    from vlm.app.recipes import run_prepare
    from vlm.app.stages import build_stage

    if stage_name not in cfg.stages:
        raise ConfigError(f"--stage: no stage '{stage_name}'; stages: {list(cfg.stages)}")
    if warmup < 1 or steps < 1 or repeats < 1:
        raise ConfigError("--warmup, --steps and --repeats must be at least 1")
    work = Path(work_dir) if work_dir else Path(cfg.out_dir) / "bench_stream"
    if prepare:
        run_prepare(cfg)
    converted = shards is None
    if converted:
        shards = _convert(cfg, stage_name, work / "shards", shard_size)
    available = shards_samples(shards)
    sizes = _memory_sizes(memory_sizes, available, shards)
    base = cfg.stages[stage_name]
    result: dict = {"stage": stage_name, "steps": steps, "warmup_steps": warmup, "repeats": repeats,
                    "batch_size": base.batch_size * base.grad_accum, "num_workers": base.num_workers,
                    "torch_threads": torch.get_num_threads(), "shards": shards, "converted": converted,
                    "shard_samples": available}
    runs: Dict[str, List[dict]] = {mode: [] for mode in MODES}
    per_step: Dict[str, List[List[int]]] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        for mode in MODES:
            data = [shards_entry(shards)] if mode == "stream" else None
            run_cfg = _stage_cfg(cfg, stage_name, warmup + steps, data)
            timer = StepTimer()
            run = build_stage(run_cfg, stage_name, out_dir=work / mode, load_init=False, callbacks=[timer])
            result["device"] = str(run.trainer.accelerator.device)
            runs[mode].append(timed_train(run.trainer, timer, warmup))
            per_step[mode].append([r["samples"] for r in run.trainer.history])
            del run
    for mode in MODES:
        result[mode] = {**medians(runs[mode]), "runs": runs[mode], "samples_per_step": per_step[mode]}
    result["ratio"] = round(result["stream"]["samples_per_s"] / result["map"]["samples_per_s"], 3)
    result["ratio_cpu"] = round(result["stream"]["samples_per_cpu_s"] / result["map"]["samples_per_cpu_s"], 3)
    result["memory"] = _memory(cfg, stage_name, shards, sizes, warmup + steps, work)
    result["env"] = environment()
    return result


def _memory(cfg: DictConfig, stage_name: str, shards: str, sizes: Sequence[int], max_steps: int, work: Path) -> dict:
    """Each size's streamed run in a fresh process; the peaks and the largest size's over the smallest's."""
    if not sizes:
        return {"runs": []}
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    OmegaConf.save(cfg, config, resolve=True)
    children = []
    for size in sizes:  # concurrently: each peak is its own process's
        spec = {"config": str(config), "stage": stage_name, "shards": shards, "samples": size,
                "max_steps": max_steps, "out": str(work / f"memory_{size}")}
        with open(work / f"memory_{size}.log", "w") as log:
            children.append(subprocess.Popen([sys.executable, "-m", "vlm.app.bench.stream", json.dumps(spec)],
                                             stdout=subprocess.PIPE, stderr=log, text=True))
    outputs = [child.communicate()[0] for child in children]
    runs = []
    for size, child, out in zip(sizes, children, outputs):
        if child.returncode != 0:
            lines = (work / f"memory_{size}.log").read_text().strip().splitlines() or ["(no output)"]
            raise TrainingError(f"vlm bench stream: the memory run over {size} samples failed: {lines[-1]}")
        runs.append(json.loads(out.strip().splitlines()[-1]))
    small, large = runs[0], runs[-1]
    memory = {"runs": runs, "ratio": round(large["peak_rss_main_mib"] / small["peak_rss_main_mib"], 3)}
    if small["peak_rss_children_mib"] and large["peak_rss_children_mib"]:
        memory["ratio_children"] = round(large["peak_rss_children_mib"] / small["peak_rss_children_mib"], 3)
    return memory


def peak_rss_kib() -> int:
    """This process's peak resident set in KiB: ``VmHWM`` of /proc/self/status, which starts afresh
    with the process's own memory at exec (``ru_maxrss`` keeps the peak of the process that forked
    it: a memory run started by a bench holding 200k map-style samples would report theirs)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_run(spec: dict) -> dict:
    """Train the stage ``spec["max_steps"]`` steps streamed over the shards' first
    ``spec["samples"]`` samples in this process; its peak resident memory and its children's (the largest)."""
    from vlm.app.stages import build_stage

    cfg = load_run_config(spec["config"])
    run_cfg = _stage_cfg(cfg, spec["stage"], spec["max_steps"], [shards_entry(spec["shards"], spec["samples"])])
    shutil.rmtree(spec["out"], ignore_errors=True)
    run = build_stage(run_cfg, spec["stage"], out_dir=Path(spec["out"]), load_init=False)
    run.trainer.train()
    history = run.trainer.history
    return {"samples": spec["samples"], "steps": len(history), "samples_trained": sum(r["samples"] for r in history),
            "peak_rss_main_mib": round(peak_rss_kib() / 1024, 1),
            "peak_rss_children_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


if __name__ == "__main__":  # a memory run, in its own process
    print(json.dumps(memory_run(json.loads(sys.argv[1]))), flush=True)
