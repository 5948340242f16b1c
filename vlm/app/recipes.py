"""Run a whole recipe: preparation steps, the ordered stages, then the evaluations."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig

from vlm.config import save_config

logger = logging.getLogger(__name__)


def run_prepare(cfg: DictConfig) -> None:
    """Generate synthetic data and train a tokenizer when the recipe asks for them."""
    from vlm.data.synthetic import ShapesStyle, generate_shapes
    from vlm.data.tokenizer_training import train_tokenizer_from_files

    for shapes in ([cfg.prepare.shapes] if cfg.prepare.shapes is not None else []) + list(cfg.prepare.extra_shapes):
        logger.info("prepare: shapes data -> %s", shapes.out)
        generate_shapes(shapes.out, num_train=shapes.num_train, num_test=shapes.num_test,
                        image_size=shapes.image_size, seed=shapes.seed,
                        style=ShapesStyle(shape_scale=shapes.shape_scale))
    scenes = cfg.prepare.scenes
    if scenes is not None:
        from vlm.data.synthetic_scenes import generate_scenes, parse_range

        logger.info("prepare: shapes scenes -> %s", scenes.out)
        per_image = parse_range(scenes.shapes_per_image, "prepare.scenes.shapes_per_image")
        generate_scenes(scenes.out, shapes_per_image=per_image, num_train=scenes.num_train,
                        num_test=scenes.num_test, image_size=scenes.image_size, seed=scenes.seed)
    multi = cfg.prepare.multi
    if multi is not None:
        from vlm.data.synthetic_multi import generate_multi_shapes

        logger.info("prepare: shapes %s -> %s", multi.kind.value, multi.out)
        generate_multi_shapes(multi.out, multi.kind.value, num_train=multi.num_train, num_test=multi.num_test,
                              image_size=multi.image_size, num_frames=multi.num_frames, seed=multi.seed)
    tok = cfg.prepare.tokenizer
    if tok is not None:
        logger.info("prepare: tokenizer -> %s", tok.out)
        train_tokenizer_from_files(list(tok.files), tok.out, tok.vocab_size, tok.min_frequency,
                                   datasets=list(tok.data))


def run_evals(cfg: DictConfig, checkpoint: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Run every evaluation of ``cfg`` on ``checkpoint`` (default: each eval's own, else the
    last stage's ``final``)."""
    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.evaluation.runner import run_eval
    from vlm.modeling.processing import build_processor

    metrics: Dict[str, Dict[str, float]] = {}
    loaded: Dict[str, tuple] = {}
    for name, ev in cfg.evals.items():
        source = checkpoint or ev.checkpoint or str(Path(cfg.out_dir) / list(cfg.stages)[-1] / "final")
        if source not in loaded:
            loaded[source] = load_pretrained(source, trust_remote_code=cfg.model.llm.trust_remote_code)
        model, tokenizer, model_cfg = loaded[source]
        processor = build_processor(model, tokenizer, model_cfg, ev.template, max_image_pixels=ev.max_image_pixels)
        metrics[name] = run_eval(model, processor, ev, Path(cfg.out_dir) / "eval", name)
    return metrics


def format_table(metrics: Dict[str, Dict[str, float]]) -> str:
    """A plain-text table of ``{eval: {metric: value}}``."""
    rows = [(ev, k, v) for ev, scores in metrics.items() for k, v in scores.items()]
    width = max([len(f"{e}/{k}") for e, k, _ in rows] + [6])
    lines = [f"{'metric':<{width}}  value", "-" * (width + 12)]
    lines += [f"{f'{e}/{k}':<{width}}  {v:10.4f}" for e, k, v in rows]
    return "\n".join(lines)


def run_recipe(cfg: DictConfig, resume: bool = False) -> Dict[str, Dict[str, float]]:
    """Prepare, train every stage in order, evaluate; writes ``out_dir/metrics.json``."""
    from vlm.app.stages import LEVERS_FILE, PRECISION_FILE, run_stage
    from vlm.evaluation.distributed import barrier, is_main

    out = Path(cfg.out_dir)
    timings: Dict[str, float] = {}
    start = time.perf_counter()
    if is_main():  # under several processes, rank 0 prepares and the others wait for its files
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        run_prepare(cfg)
    barrier()
    timings["prepare"] = time.perf_counter() - start
    precision: Dict[str, dict] = {}
    levers: Dict[str, dict] = {}
    for name in cfg.stages:
        t0 = time.perf_counter()
        final = run_stage(cfg, name, resume=resume)
        timings[f"stage/{name}"] = time.perf_counter() - t0
        precision[name] = json.loads((final.parent / PRECISION_FILE).read_text())
        levers[name] = json.loads((final.parent / LEVERS_FILE).read_text())
    t0 = time.perf_counter()
    metrics = run_evals(cfg)
    timings["evaluation"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    if is_main():  # under several processes, every rank has the same scores; one writes them
        (out / "metrics.json").write_text(json.dumps({**metrics, "timings_s": timings, "precision": precision,
                                                         "levers": levers}, indent=2))
        print(format_table(metrics))
        print(f"total time: {timings['total']:.1f} s  ->  {out / 'metrics.json'}")
        track_evaluations(cfg, metrics)
    return metrics


def track_evaluations(cfg: DictConfig, metrics: Dict[str, Dict[str, float]]) -> None:
    """The final evaluations' scores to the trackers of ``report_to`` (main process): a tracker
    run ``<run name>/eval`` under ``out_dir/eval``."""
    from vlm.app.stages import tracking_settings
    from vlm.training.tracking import log_evaluations

    names = log_evaluations(tracking_settings(cfg), metrics, Path(cfg.out_dir) / "eval")
    if names:
        logger.info("evaluations sent to %s", ", ".join(names))
