"""``vlm prefs generate`` and a stage's ``generate_pairs``: a checkpoint, eval questions, a judge."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig

from vlm.checkpoint.pretrained import load_pretrained
from vlm.core.errors import ConfigError
from vlm.core.registry import closest
from vlm.data.formats import read_dataset
from vlm.evaluation.judges import JUDGES
from vlm.evaluation.preference_pairs import PairSettings, generate_pairs
from vlm.evaluation.tasks import TASKS
from vlm.modeling.processing import build_processor

logger = logging.getLogger(__name__)


def check_pair_sources(cfg: DictConfig, eval_name: str, judge: str, eval_key: str, judge_key: str) -> None:
    """ConfigError naming ``eval_key`` / ``judge_key`` when ``eval_name`` is not an entry of the
    config's ``evals`` or ``judge`` is not a registered judge."""
    if eval_name not in cfg.evals:
        raise ConfigError(f"{eval_key}: the config has no evals entry '{eval_name}'"
                          f"{closest(eval_name, list(cfg.evals))}; evals: {list(cfg.evals)}")
    if judge not in JUDGES:
        raise ConfigError(f"{judge_key}: unknown judge '{judge}'{closest(judge, JUDGES.names())}; known: "
                          f"{', '.join(JUDGES.names())}")


def write_pairs(cfg: DictConfig, checkpoint: str, out: Path, eval_name: str, judge: str,
                settings: PairSettings) -> Dict[str, int]:
    """Write ``out``'s pairs from ``checkpoint``'s sampled answers to the questions of
    ``cfg.evals[eval_name]`` (``settings.max_new_tokens`` None: the entry's), scored by judge
    ``judge``; returns the counts (resumable: vlm.evaluation.preference_pairs)."""
    ev = cfg.evals[eval_name]
    model, tokenizer, model_cfg = load_pretrained(checkpoint, trust_remote_code=cfg.model.llm.trust_remote_code)
    processor = build_processor(model, tokenizer, model_cfg, ev.template, max_image_pixels=ev.max_image_pixels)
    task = TASKS.get(ev.task)
    samples = read_dataset(ev.data.format or task.data_format, image_token=processor.image_token,
                           **{**task.reader_defaults, **dict(ev.data.args)})
    if ev.data.max_samples:
        samples = samples[: ev.data.max_samples]
    if settings.max_new_tokens is None:
        settings = dataclasses.replace(settings, max_new_tokens=ev.max_new_tokens)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return generate_pairs(model, processor, samples, JUDGES.get(judge).build(None, None), Path(out), settings)


def prefs_generate(cfg, args) -> dict:
    """Write ``args.out``'s pairs from ``args.checkpoint``'s sampled answers to the questions of
    ``cfg.evals[args.eval]``, scored by judge ``args.judge``; returns the counts."""
    check_pair_sources(cfg, args.eval, args.judge, "--eval", "--judge")
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {value}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    settings = PairSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    counts = write_pairs(cfg, args.checkpoint, Path(args.out), args.eval, args.judge, settings)
    return {"out": str(args.out), **counts}


def pairs_checkpoint(stage) -> Optional[str]:
    """Whose answers a stage's ``generate_pairs`` samples: its ``checkpoint``, else the stage's ``init_from``."""
    return stage.generate_pairs.checkpoint or stage.init_from


def stage_pairs(cfg: DictConfig, name: str) -> Optional[dict]:
    """Run stage ``name``'s ``generate_pairs`` block (if any) on the main process, the others
    waiting; a complete ``out`` (written atomically, last) is kept as it is. Returns the counts
    (``{"out", "kept": True}`` for a kept file) or None without the block."""
    from vlm.evaluation.distributed import barrier, is_main

    block = cfg.stages[name].generate_pairs
    if block is None:
        return None
    out = Path(block.out)
    counts: dict = {"out": str(out)}
    if is_main():
        if out.is_file():
            logger.info("stage %s: generate_pairs: %s is complete; kept", name, out)
            counts.update(pairs=len(json.loads(out.read_text())), kept=True)
        else:
            settings = PairSettings(n=block.n, temperature=block.temperature, top_p=block.top_p,
                                    max_new_tokens=block.max_new_tokens, batch_size=block.batch_size,
                                    seed=block.seed)
            checkpoint = pairs_checkpoint(cfg.stages[name])
            logger.info("stage %s: generate_pairs from %s (evals.%s, judge %s) -> %s", name, checkpoint,
                        block.eval, block.judge, out)
            counts.update(write_pairs(cfg, checkpoint, out, block.eval, block.judge, settings))
            logger.info("stage %s: generate_pairs: %s", name, counts)
    barrier()
    return counts
