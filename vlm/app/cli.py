"""The ``vlm`` command: train, run, eval, score, data, chat, serve, bench, export, env, models."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Iterator, List, Optional

from vlm.config import ConfigError
from vlm.core.errors import DataFormatError, TrainingPreempted, VLMError


def _load(args, out_required: bool = False):
    from vlm.app.wiring import load_run_config

    defaults = {"out_dir": args.out} if getattr(args, "out", None) else {}
    if out_required and not defaults:
        raise ConfigError("--out DIR is required")
    return load_run_config(args.config, args.overrides, **defaults)


def cmd_train(args) -> None:
    """Train the config's stages (or one, with --stage) without running its evaluations."""
    from vlm.app.preflight import preflight
    from vlm.app.stages import run_stage

    cfg = _load(args)
    _resume_after_elastic_restart(args)
    names = [args.stage] if args.stage else list(cfg.stages)
    for name in names:
        if name not in cfg.stages:
            raise ConfigError(f"--stage: no stage '{name}' in {args.config}; stages: {list(cfg.stages)}")
    preflight(cfg, names, whole_recipe=False)
    with _run_dir(cfg, args):
        for name in names:
            print(f"{name}: {run_stage(cfg, name, resume=args.resume)}")


@contextlib.contextmanager
def _run_dir(cfg, args) -> Iterator:
    """The guard of ``out_dir`` (:func:`vlm.checkpoint.output_dirs.run_output_dir`); writes its config.yaml first."""
    from vlm.checkpoint.output_dirs import RUN_CONFIG, run_output_dir
    from vlm.config import save_config, to_container

    with run_output_dir(cfg.out_dir, to_container(cfg), args.resume, args.overwrite) as out:
        save_config(cfg, out / RUN_CONFIG)
        yield out


def cmd_run(args) -> None:
    """Run a recipe end to end and write OUT/metrics.json."""
    from vlm.app.preflight import preflight
    from vlm.app.recipes import run_recipe

    cfg = _load(args, out_required=True)
    _resume_after_elastic_restart(args)
    preflight(cfg, list(cfg.stages), whole_recipe=True)
    with _run_dir(cfg, args):
        run_recipe(cfg, resume=args.resume)


def _resume_after_elastic_restart(args) -> None:
    """Under torchrun's elastic agent after a restart (``TORCHELASTIC_RESTART_COUNT`` > 0), resume
    from the latest complete checkpoint as if --resume was given (the first attempt already
    replaced the folder if --overwrite was given)."""
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if args.resume or not restarts.isdigit() or int(restarts) == 0:
        return
    args.resume, args.overwrite = True, False
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).info("torchrun restart %s (TORCHELASTIC_RESTART_COUNT): resuming from the "
                                         "latest checkpoint, as with --resume", restarts)


TASK_FLAGS = ("captions", "image_root", "rerank_k", "batch_size", "max_samples", "annotations")


def cmd_eval(args) -> None:
    """Run the config's evaluations on a checkpoint, or one task (--task) on a data file."""
    from vlm.app.recipes import format_table, run_evals

    start = time.perf_counter()
    if args.task:
        if args.config is not None or args.overrides:
            raise ConfigError(f"vlm eval --task takes no config or overrides, got "
                              f"{[args.config] + list(args.overrides)}")
        metrics = {args.task: _eval_task(args)}
    else:
        given = [f"--{f.replace('_', '-')}" for f in TASK_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only with `vlm eval --task`; a config's evals take "
                              "their settings from the config")
        if args.config is None:
            raise ConfigError("vlm eval needs a CONFIG, or --task NAME with --checkpoint and --captions")
        cfg = _load(args)
        metrics = run_evals(cfg, checkpoint=args.checkpoint)
    from vlm.evaluation.distributed import is_main

    if is_main():  # under torchrun the ranks share the samples and agree on the scores
        if args.out:
            _write_eval_metrics(args, metrics, time.perf_counter() - start)
        if not args.task:
            from vlm.app.recipes import track_evaluations

            track_evaluations(cfg, metrics)
        print(format_table(metrics))
        print(json.dumps(metrics))  # the last line of stdout: scripts read it


def _write_eval_metrics(args, metrics: dict, seconds: float) -> None:
    """``--out``: ``OUT/metrics.json`` as ``vlm run`` writes it (``{eval: {metric: value}}``, the
    timings, and the checkpoint evaluated)."""
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {**metrics, "timings_s": {"evaluation": seconds, "total": seconds},
              "checkpoint": str(args.checkpoint) if args.checkpoint else None}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    print(f"-> {out / 'metrics.json'}", file=sys.stderr)


def _eval_task(args) -> dict:
    """`vlm eval --task retrieval --checkpoint DIR --captions FILE`: one task of a stage output on
    one data file (read by the task's own format), e.g. recall@1/5/10 of a Q-Former model."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from vlm.app.wiring import check_eval
    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.config import EvalConfig
    from vlm.evaluation.runner import run_eval
    from vlm.evaluation.tasks import TASKS
    from vlm.modeling.processing import build_processor

    _require_registered(TASKS, args.task, "--task")
    if args.rerank_k is not None and (args.task != "retrieval" or args.rerank_k < 1):
        raise ConfigError(f"--rerank-k: must be at least 1, and for --task retrieval only; got {args.rerank_k} "
                          f"for task '{args.task}'")
    if args.task == "pope":
        data = _pope_task_data(args)
    elif not args.checkpoint or not args.captions:
        raise ConfigError(f"vlm eval --task {args.task} needs --checkpoint (a stage output) and --captions "
                          "(a COCO captions file)")
    elif args.annotations:
        raise ConfigError(f"--annotations: for --task pope only; task '{args.task}' reads --captions")
    else:
        data = {"path": args.captions}
    cfg = OmegaConf.structured(EvalConfig)
    cfg.task = args.task
    cfg.data.args = {**data, **({"image_root": args.image_root} if args.image_root else {})}
    cfg.data.max_samples = args.max_samples
    cfg.rerank_k = args.rerank_k
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    check_eval(cfg, "--task")
    model, tokenizer, model_cfg = load_pretrained(args.checkpoint)
    processor = build_processor(model, tokenizer, model_cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    return run_eval(model, processor, cfg, out, args.task)


def _pope_task_data(args) -> dict:
    """The pope reader's arguments of `vlm eval --task pope --annotations FILE` (COCO instances)."""
    if not args.checkpoint or not args.annotations or args.captions:
        raise ConfigError("vlm eval --task pope needs --checkpoint (a stage output) and --annotations (a COCO "
                          "instances file to build the questions from), not --captions")
    return {"annotations": args.annotations}


def cmd_score(args) -> None:
    """Score official-format result files and print one JSON object."""
    if args.task == "caption":
        from vlm.evaluation.caption_metric import score_captions

        scores = score_captions(args.annotations, args.results, spice=args.spice)
    elif args.task == "pope":
        from vlm.evaluation.pope_metric import score_pope_files

        scores = score_pope_files(args.annotations, args.results)
    else:
        from vlm.evaluation.vqa_metric import score_vqa

        if not args.questions:
            raise ConfigError("vlm score vqa needs --questions")
        scores = score_vqa(args.questions, args.annotations, args.results, allow_missing=args.allow_missing)
    if args.details_out:
        from pathlib import Path

        Path(args.details_out).write_text(json.dumps(scores, indent=1))
    print(json.dumps(scores if args.details else score_summary(scores)))


def score_summary(scores: dict) -> dict:
    """The scores without per-question detail (a VQA score's ``per_question`` becomes a count)."""
    summary = {k: v for k, v in scores.items() if k != "per_question"}
    if "per_question" in scores:
        summary["questions"] = len(scores["per_question"])
    return summary


def cmd_data_shapes(args) -> None:
    """Write the synthetic shapes dataset."""
    from vlm.data.synthetic import ShapesStyle, generate_shapes

    if args.kind != "single":
        from vlm.data.synthetic_multi import generate_multi_shapes

        paths = generate_multi_shapes(args.out, args.kind, num_train=args.num_train, num_test=args.num_test,
                                      image_size=args.image_size, num_frames=args.num_frames, seed=args.seed)
        print(json.dumps(paths, indent=2, default=str))
        return
    colors = tuple(c.strip() for c in args.colors.split(",")) if args.colors else None
    halves = args.shapes_per_image if args.shapes_per_image <= 2 else 1  # 3 to 5: a scene of that many
    style = ShapesStyle(shape_scale=args.shape_scale, jitter=args.jitter, shapes_per_image=halves,
                        background=args.background, colors=colors, phrasing=args.phrasing)
    try:
        style.check()
    except ValueError as exc:
        raise ConfigError(f"vlm data shapes: {exc}") from None
    if args.scene_shapes or args.shapes_per_image > 2:  # several shapes per image, with COCO instances for POPE
        from vlm.data.synthetic_scenes import generate_scenes, parse_range

        if args.scene_shapes and args.shapes_per_image != 1:
            raise ConfigError(f"vlm data shapes: --scene-shapes and --shapes-per-image {args.shapes_per_image} both "
                              "set the shapes per image; give one")
        per_image = parse_range(args.scene_shapes) if args.scene_shapes else (args.shapes_per_image,) * 2
        paths = generate_scenes(args.out, shapes_per_image=per_image, num_train=args.num_train,
                                num_test=args.num_test, image_size=args.image_size, seed=args.seed, style=style)
    else:
        paths = generate_shapes(args.out, num_train=args.num_train, num_test=args.num_test,
                                image_size=args.image_size, seed=args.seed, style=style)
    print(json.dumps(paths, indent=2, default=str))


def cmd_data_convert(args) -> None:
    """Write a stage's data (every source, any format) as webdataset or parquet shards, images embedded."""
    from vlm.app.data_tools import convert
    from vlm.app.wiring import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    print(json.dumps(convert(cfg, args.stage, args.config, args.to, args.out, args.shard_size), indent=2))


def cmd_data_inspect(args) -> None:
    """Report a stage's data: samples per source, skipped records and why, token lengths, rendered samples."""
    from vlm.app.data_tools import format_report, inspect
    from vlm.app.wiring import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    print(format_report(inspect(cfg, args.stage, args.config, show=args.show, image_tokens=args.image_tokens)))


def cmd_chat(args) -> None:
    """Ask a trained model about an image: one prompt, or an interactive loop."""
    from vlm.inference.chat import chat

    if not args.image and not args.video:
        raise SystemExit("vlm chat: give --image and/or --video")
    chat(args.checkpoint, args.image or [], args.prompt, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, template=args.template, trust_remote_code=args.trust_remote_code,
         use_task_prompt=not args.no_task_prompt, videos=args.video or [])


def cmd_bench_feature_cache(args) -> None:
    """Train a stage with its frozen encoder running and from the feature cache; print samples/s."""
    from vlm.app.bench.feature_cache import bench_feature_cache

    result = bench_feature_cache(_load(args), args.stage, steps=args.steps, warmup=args.warmup,
                                 repeats=args.repeats, prepare=args.prepare)
    print(json.dumps({"config": args.config, **result}, indent=2))


def cmd_bench_train(args) -> None:
    """Train a stage in vlm and in transformers, alternating step by step; print samples/s and tokens/s."""
    from vlm.app.bench.train import bench_train

    result = bench_train(_load(args), args.stage, steps=args.steps, warmup=args.warmup,
                         precision=args.precision, prepare=args.prepare)
    print(json.dumps({"config": args.config, **result}, indent=None if args.json else 2))


def cmd_bench_stream(args) -> None:
    """Train a stage from its own data and streamed from webdataset shards; samples/s and peak memory."""
    from vlm.app.bench.stream import bench_stream

    try:
        sizes = [int(k) for k in args.memory_sizes.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--memory-sizes {args.memory_sizes!r}: expected sample counts, e.g. 20000,200000") from None
    result = bench_stream(_load(args), args.stage, shards=args.shards, steps=args.steps, warmup=args.warmup,
                          repeats=args.repeats, memory_sizes=sizes, shard_size=args.shard_size, prepare=args.prepare)
    print(json.dumps({"config": args.config, **result}, indent=None if args.json else 2))


def cmd_bench_generate(args) -> None:
    """Generate the eval's answers with vlm's decode and with transformers' generate; print tok/s."""
    from vlm.app.bench.generate import bench_generate

    result = bench_generate(args.target, eval_name=args.eval, overrides=args.overrides, repeats=args.repeats,
                            limit=args.limit, prepare=args.prepare, out=args.out)
    print(json.dumps(result, indent=None if args.json else 2))


def cmd_bench_serve(args) -> None:
    """Soak `vlm serve CHECKPOINT`: concurrent clients, a share of bad requests; statuses, latency, memory."""
    from vlm.app.bench.serve_soak import soak_serve

    result = soak_serve(args.checkpoint, requests=args.requests, clients=args.clients, bad_ratio=args.bad_ratio,
                        max_tokens=args.max_tokens, warm_requests=args.warm_requests, seed=args.seed)
    print(json.dumps(result, indent=None if args.json else 2))


def _require_registered(registry, name: str, flag: str) -> None:
    """ConfigError naming ``flag`` (with the registry's "did you mean") when ``name`` is unknown."""
    try:
        registry.get(name)
    except KeyError as exc:
        raise ConfigError(f"{flag}: {exc.args[0]}") from None


def _export(args, export) -> None:
    """Run ``export(checkpoint, out, dtype=, overwrite=)`` and print the folder it wrote; a layout
    the target cannot hold is one line naming the checkpoint."""
    from vlm.core.errors import LayoutError

    try:
        out = export(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except LayoutError as exc:
        raise ConfigError(f"{args.checkpoint}: {exc}") from None
    print(f"exported: {out}")


def cmd_export_hf_llava(args) -> None:
    """Write a stage output as a transformers LLaVA folder (LlavaForConditionalGeneration)."""
    from vlm.interop.hf_llava import export_hf_llava

    _export(args, export_hf_llava)


def cmd_export_hf_blip2(args) -> None:
    """Write a Q-Former stage output as a transformers BLIP-2 folder (Blip2ForConditionalGeneration)."""
    from vlm.interop.hf_blip2 import export_hf_blip2

    _export(args, export_hf_blip2)


def cmd_export_hf_llava_next(args) -> None:
    """Write a tiled (AnyRes) stage output as a transformers LLaVA-NeXT folder (LlavaNextForConditionalGeneration)."""
    from vlm.interop.hf_llava_next import export_hf_llava_next

    _export(args, export_hf_llava_next)


def cmd_export_hf_llava_onevision(args) -> None:
    """Write a tiled stage output with OneVision's multi-image and video layout as a transformers
    LLaVA-OneVision folder (LlavaOnevisionForConditionalGeneration)."""
    from vlm.interop.hf_llava_onevision import export_hf_llava_onevision

    _export(args, export_hf_llava_onevision)


def cmd_import_hf_llava(args) -> None:
    """Write a local transformers LLaVA folder as a vlm stage output."""
    from vlm.data.image_transforms import PREPROCESSING
    from vlm.data.templates import TEMPLATES
    from vlm.interop.hf_llava import LlavaLayoutError, import_hf_llava

    if args.template != "tokenizer":  # the tokenizer's own template is not a registry name
        _require_registered(TEMPLATES, args.template, "--template")
    _require_registered(PREPROCESSING, args.preprocess, "--preprocess")
    try:
        out = import_hf_llava(args.folder, args.out, template=args.template, image_token=args.image_token,
                              preprocess=args.preprocess, overwrite=args.overwrite)
    except LlavaLayoutError as exc:
        raise ConfigError(str(exc)) from None
    print(f"imported: {out} (vlm chat {out} --image IMG, or init_from: {out} with model.vision.pretrained: "
          f"{out}/vision and model.llm.name_or_path: {out}/llm)")


def cmd_import_hf_blip2(args) -> None:
    """Write a local transformers BLIP-2 or InstructBLIP folder (causal or T5 language model) as a vlm stage output."""
    from vlm.core.errors import LayoutError
    from vlm.data.image_transforms import PREPROCESSING
    from vlm.data.templates import TEMPLATES
    from vlm.interop.hf_blip2_import import import_hf_blip2

    if args.template is not None:
        _require_registered(TEMPLATES, args.template, "--template")
    _require_registered(PREPROCESSING, args.preprocess, "--preprocess")
    try:
        out = import_hf_blip2(args.folder, args.out, template=args.template, preprocess=args.preprocess,
                              overwrite=args.overwrite)
    except LayoutError as exc:
        raise ConfigError(str(exc)) from None
    print(f"imported: {out} (vlm chat {out} --image IMG, or init_from: {out})")


def cmd_merge(args) -> None:
    """Fold a stage output's LoRA adapters into full weights (a stage output like any other)."""
    from vlm.interop.merge import merge_checkpoint

    print(f"merged: {merge_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)}")


def cmd_serve(args) -> None:
    """Serve a stage output with an OpenAI-compatible API (/v1/chat/completions) and a web page."""
    from pathlib import Path

    from vlm.inference.serving.app import serve

    for flag, value, low in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1)):
        if value < low:
            raise ConfigError(f"{flag}: must be at least {low}, got {value}")
    for flag, value in (("--max-request-mb", args.max_request_mb), ("--request-timeout-s", args.request_timeout_s)):
        if not value > 0:
            raise ConfigError(f"{flag}: must be > 0, got {value}")
    if not args.shutdown_grace_s >= 0:
        raise ConfigError(f"--shutdown-grace-s: must be >= 0, got {args.shutdown_grace_s}")
    if args.image_root and not Path(args.image_root).is_dir():
        raise ConfigError(f"--image-root {args.image_root}: no such folder")
    serve(args.checkpoint, host=args.host, port=args.port, image_root=args.image_root, model_name=args.model_name,
          max_batch_size=args.max_batch_size, template=args.template, max_request_mb=args.max_request_mb,
          max_queue=args.max_queue, request_timeout_s=args.request_timeout_s, shutdown_grace_s=args.shutdown_grace_s)


def cmd_prefs_generate(args) -> None:
    """Sample answers from a checkpoint, score them with a judge, write preference pairs (--out)."""
    from vlm.app.prefs import prefs_generate
    from vlm.app.wiring import load_run_config

    print(json.dumps(prefs_generate(load_run_config(args.config, args.overrides), args)))


def cmd_models(args) -> None:
    """List the registered vision encoders, connectors, templates and data formats."""
    from vlm.app.wiring import catalog

    entries = catalog()
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    for kind, names in entries.items():
        print(f"{kind}: {', '.join(names)}")


def cmd_env(args) -> None:
    """Print what a bug report needs: versions, CPU capability, GPUs, what precision auto picks."""
    from vlm.app.env import environment, format_environment

    env = environment()
    print(json.dumps(env, indent=2) if args.json else format_environment(env))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vlm`` command."""
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of expected errors too (or set VLM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, out_help="output folder (sets out_dir)", config_nargs=None):
        p.add_argument("config", nargs=config_nargs, help="YAML config")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.align.batch_size=16")
        p.add_argument("--out", help=out_help)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    with_config(p)
    p.add_argument("--stage", help="train only this stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty out_dir that is not a run of this config")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help=cmd_run.__doc__)
    with_config(p)
    p.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out that is not a run of this config")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help=cmd_eval.__doc__,
                       description="vlm eval CONFIG [overrides] [--checkpoint DIR]: the config's evals. "
                                   "vlm eval --task retrieval --checkpoint DIR --captions FILE [--image-root DIR] "
                                   "[--rerank-k K]: one task (e.g. image-text retrieval of a Q-Former model) on "
                                   "a COCO captions file. vlm eval --task pope --checkpoint DIR --annotations "
                                   "INSTANCES [--image-root DIR]: POPE questions built from COCO instances.")
    with_config(p, out_help="output folder (sets out_dir); --task: where TASK_results.json goes "
                            "(default: beside the checkpoint, in eval/)", config_nargs="?")
    p.add_argument("--checkpoint", help="stage output folder to evaluate (default: the last stage's final)")
    p.add_argument("--task", help="evaluate this task (vlm models lists them) on --captions, without a config")
    p.add_argument("--captions", help="--task: COCO captions file (official or Karpathy)")
    p.add_argument("--image-root", help="--task: folder the captions file's image paths are relative to")
    p.add_argument("--rerank-k", type=int, help="--task retrieval: re-rank each query's k best with the ITM head")
    p.add_argument("--batch-size", type=int, help="--task: batch size (default 16)")
    p.add_argument("--max-samples", type=int, help="--task: only the first N images")
    p.add_argument("--annotations", help="--task pope: COCO instances file the questions are built from")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help=cmd_score.__doc__)
    p.add_argument("task", choices=["caption", "vqa", "pope"])
    p.add_argument("--annotations", required=True, help="COCO captions JSON, or VQAv2 annotations JSON, or POPE "
                                                         "questions (JSON lines with question_id and label)")
    p.add_argument("--results", required=True, help="results JSON in the official format (pope: JSON lines "
                                                    "with question_id and answer)")
    p.add_argument("--questions", help="VQAv2 questions JSON (vqa only)")
    p.add_argument("--spice", action="store_true", help="also compute SPICE (needs CoreNLP; not offline)")
    p.add_argument("--allow-missing", action="store_true",
                   help="vqa: score only the answered questions when results lack some")
    p.add_argument("--details", action="store_true", help="print every question's score too (vqa: per_question)")
    p.add_argument("--details-out", help="write the full scores, per-question detail included, to this JSON file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("data", help="generate, convert and inspect datasets")
    data_sub = p.add_subparsers(dest="dataset", required=True)
    s = data_sub.add_parser("shapes", help=cmd_data_shapes.__doc__)
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-test", type=int, default=200)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape-scale", type=float, default=1.0, help="multiply the shapes' sizes (0.1-1.6; "
                   "0.1-0.2 with --image-size 256-384: small shapes for AnyRes tiling)")
    s.add_argument("--jitter", type=float, default=0.05, help="largest shift of a shape's centre, fraction of the side")
    s.add_argument("--shapes-per-image", type=int, default=1, choices=[1, 2, 3, 4, 5],
                   help="2: a shape in each half; questions name which ('the shape on the left'); 3 to 5: "
                        "scenes of that many distinct shapes, as --scene-shapes K-K")
    s.add_argument("--background", default="solid", choices=["solid", "noise", "gradient"])
    s.add_argument("--colors", help="comma-separated colour names to draw from (default: the six demo colours; "
                                    "also pink, brown, cyan, gray, black, white, lime, navy)")
    s.add_argument("--phrasing", default="default", choices=["default", "alt"], help="question wordings")
    s.add_argument("--scene-shapes", metavar="MIN-MAX",
                   help="scenes: MIN to MAX non-overlapping shapes per image (e.g. 2-4), COCO instances_SPLIT.json "
                        "and yes/no existence questions for POPE (docs/pope.md); default: one shape per image")
    s.add_argument("--kind", default="single", choices=["single", "pairs", "clips"],
                   help="pairs: two images, questions across them; clips: moving / appearing shapes (video)")
    s.add_argument("--num-frames", type=int, default=8, help="frames per clip (--kind clips)")
    s.set_defaults(func=cmd_data_shapes)
    for name, func in (("convert", cmd_data_convert), ("inspect", cmd_data_inspect)):
        s = data_sub.add_parser(name, help=func.__doc__)
        s.add_argument("config", help="YAML config")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.align.data.0.max_samples=100")
        s.add_argument("--stage", required=True, help="the stage whose data to read")
        s.set_defaults(func=func)
        if name == "convert":
            s.add_argument("--to", required=True, choices=["webdataset", "hf_dataset"])
            s.add_argument("--out", required=True, help="a new (or empty) folder for the shards and manifest.json")
            s.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
        else:
            s.add_argument("--show", type=int, default=3, help="samples to render")
            s.add_argument("--image-tokens", type=int, default=1,
                           help="placeholder tokens per image when checking max_length (the model's count)")

    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    p.add_argument("checkpoint", help="stage output folder (e.g. runs/demo/instruct/final)")
    p.add_argument("--image", action="append", help="an image; repeat for several, in marker order")
    p.add_argument("--video", action="append", help="a video file or a folder of frames; repeatable")
    p.add_argument("--prompt", help="one question; without it, an interactive loop")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--template", help="chat template (default: the model's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the LLM's own Python code (never taken from the checkpoint's model.yaml)")
    p.add_argument("--no-task-prompt", action="store_true",
                   help="ask the question as typed, without the model's task_prompt_suffix")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="benchmarks (measurements, not tests)")
    bench_sub = p.add_subparsers(dest="benchmark", required=True)
    s = bench_sub.add_parser("feature-cache", help=cmd_bench_feature_cache.__doc__)
    with_config(s, out_help="sets out_dir; the benchmark writes under OUT/bench_feature_cache")
    s.add_argument("--stage", default="align", help="the stage to train (its vision encoder must be frozen)")
    s.add_argument("--steps", type=int, default=30, help="timed optimizer steps per mode")
    s.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    s.add_argument("--repeats", type=int, default=3, help="encoder / cache runs in turn; medians are reported")
    s.add_argument("--prepare", action="store_true", help="run the recipe's prepare step first (demo data)")
    s.set_defaults(func=cmd_bench_feature_cache)
    s = bench_sub.add_parser("train", help=cmd_bench_train.__doc__)
    with_config(s, out_help="sets out_dir; the benchmark writes under OUT/bench_train")
    s.add_argument("--stage", required=True, help="the stage to train (objective lm)")
    s.add_argument("--against", choices=["hf"], default="hf", help="the library to compare with (transformers)")
    s.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side")
    s.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="override the stage's precision")
    s.add_argument("--prepare", action="store_true", help="run the recipe's prepare step first (demo data)")
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=cmd_bench_train)
    s = bench_sub.add_parser("stream", help=cmd_bench_stream.__doc__)
    with_config(s, out_help="sets out_dir; the benchmark writes under OUT/bench_stream")
    s.add_argument("--stage", required=True, help="the stage to train (map-style data)")
    s.add_argument("--shards", help="webdataset shards holding the stage's samples, e.g. 'DIR/{000000..000019}.tar' "
                                    "(default: the stage's data converted into OUT/bench_stream/shards)")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard when converting")
    s.add_argument("--steps", type=int, default=30, help="timed optimizer steps per mode")
    s.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    s.add_argument("--repeats", type=int, default=3, help="map-style / streamed runs in turn; medians are reported")
    s.add_argument("--memory-sizes", default="20000,200000",
                   help="comma-separated sample counts: a streamed run over each in a fresh process, peak memory "
                        "compared ('' skips)")
    s.add_argument("--prepare", action="store_true", help="run the recipe's prepare step first (its data)")
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=cmd_bench_stream)
    s = bench_sub.add_parser("generate", help=cmd_bench_generate.__doc__)
    s.add_argument("target", help="a stage output folder (.../final) or a recipe YAML (its last stage's final)")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the recipe")
    s.add_argument("--eval", default="vqa", help="the recipe's evaluation whose prompts to answer")
    s.add_argument("--against", choices=["hf"], default="hf", help="the library to compare with (transformers)")
    s.add_argument("--repeats", type=int, default=3, help="vlm / transformers passes in turn; medians reported")
    s.add_argument("--limit", type=int, help="only the first N prompts")
    s.add_argument("--out", help="sets out_dir of a recipe")
    s.add_argument("--prepare", action="store_true", help="run the recipe's prepare step first (demo data)")
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=cmd_bench_generate)
    s = bench_sub.add_parser("serve", help=cmd_bench_serve.__doc__)
    s.add_argument("checkpoint", help="a stage output folder (.../final)")
    s.add_argument("--requests", type=int, default=2000, help="requests in all")
    s.add_argument("--clients", type=int, default=50, help="concurrent clients")
    s.add_argument("--bad-ratio", type=float, default=0.1, help="share of bad requests (each must get a 4xx)")
    s.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the good requests")
    s.add_argument("--warm-requests", type=int, default=100, help="memory is compared with after these")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="one line of JSON")
    s.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("export", help="write a trained model in another library's format")
    export_sub = p.add_subparsers(dest="format", required=True)
    for name, func, layout, reader in (
            ("hf-llava", cmd_export_hf_llava, "hf_clip + mlp2x_gelu + a causal LM", "LlavaForConditionalGeneration"),
            ("hf-blip2", cmd_export_hf_blip2, "hf_blip2_vision + qformer + a causal LM",
             "Blip2ForConditionalGeneration"),
            ("hf-llava-next", cmd_export_hf_llava_next, "hf_clip + mlp2x_gelu + a causal LM, model.vision.tiling",
             "LlavaNextForConditionalGeneration"),
            ("hf-llava-onevision", cmd_export_hf_llava_onevision,
             "hf_clip + mlp2x_gelu + a causal LM, model.vision.tiling (multi_image: base), model.video.newline",
             "LlavaOnevisionForConditionalGeneration")):
        s = export_sub.add_parser(name, help=func.__doc__)
        s.add_argument("checkpoint", help=f"stage output folder ({layout})")
        s.add_argument("--out", required=True, help=f"folder to write ({reader}.from_pretrained reads it)")
        s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                       help="weights' dtype (default: the checkpoint's model.llm.dtype)")
        s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
        s.set_defaults(func=func)

    p = sub.add_parser("import", help="turn another library's model into a vlm stage output")
    import_sub = p.add_subparsers(dest="format", required=True)
    s = import_sub.add_parser("hf-llava", help=cmd_import_hf_llava.__doc__)
    s.add_argument("folder", help="local transformers LLaVA folder (config.json, safetensors, tokenizer)")
    s.add_argument("--out", required=True, help="stage output folder to write")
    s.add_argument("--template", default="vicuna_v1", help="chat template it was trained with (LLaVA-1.5: vicuna_v1)")
    s.add_argument("--preprocess", default="pad", help="image preprocessing it was trained with (LLaVA-1.5: pad)")
    s.add_argument("--image-token", default="<image>", help="the tokenizer's image placeholder token")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.set_defaults(func=cmd_import_hf_llava)
    s = import_sub.add_parser("hf-blip2", help=cmd_import_hf_blip2.__doc__)
    s.add_argument("folder", help="local transformers BLIP-2 / InstructBLIP folder (config.json, safetensors, "
                   "tokenizer; InstructBLIP: qformer_tokenizer/)")
    s.add_argument("--out", required=True, help="stage output folder to write")
    s.add_argument("--template", default=None,
                   help="prompt template (default: the paper's, blip2_qa for BLIP-2, instructblip for InstructBLIP)")
    s.add_argument("--preprocess", default="resize", help="image preprocessing (BLIP-2's: resize)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    s.set_defaults(func=cmd_import_hf_blip2)

    p = sub.add_parser("merge", help=cmd_merge.__doc__)
    p.add_argument("checkpoint", help="stage output folder with LoRA adapters (e.g. runs/demo/instruct/final)")
    p.add_argument("--out", required=True, help="stage output folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("checkpoint", help="stage output folder (e.g. runs/demo/instruct/final)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--image-root", help="folder local image paths may come from (default: data: URIs only)")
    p.add_argument("--model-name", default="vlm", help="the model id /v1/models lists")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests answered together at most")
    p.add_argument("--template", help="chat template (default: the model's)")
    p.add_argument("--max-request-mb", type=float, default=20.0, help="larger request bodies get 413 (MiB)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; beyond: 503 + Retry-After")
    p.add_argument("--request-timeout-s", type=float, default=300.0,
                   help="a request not answered in this time gets 504 and its work is dropped")
    p.add_argument("--shutdown-grace-s", type=float, default=30.0,
                   help="on SIGTERM: time given to requests in flight before exiting")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prefs", help="preference pairs")
    prefs_sub = p.add_subparsers(dest="prefs_command", required=True)
    s = prefs_sub.add_parser("generate", help=cmd_prefs_generate.__doc__)
    s.add_argument("checkpoint", help="stage output folder whose answers are sampled")
    s.add_argument("config", help="YAML config: its evals.<--eval> entry gives the questions and references")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evals.vqa.data.max_samples=100")
    s.add_argument("--out", required=True, help="pairs JSON to write (format: preference_json)")
    s.add_argument("--eval", default="vqa", help="the config's evals entry to read (default: vqa)")
    s.add_argument("--judge", default="vqa_accuracy", help="registered judge (a plug-in via the config's plugins)")
    s.add_argument("--n", type=int, default=4, help="answers sampled per question (default 4)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--max-new-tokens", type=int, help="default: the eval entry's")
    s.add_argument("--batch-size", type=int, default=16, help="questions per chunk (default 16)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_prefs_generate)

    p = sub.add_parser("env", help=cmd_env.__doc__)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("models", help=cmd_models.__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``vlm`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also accepted after the subcommand
        args.debug, extra = True, [e for e in extra if e != "--debug"]
    # overrides may come after options (`vlm train C --out D a.b=c`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    debug = args.debug or os.environ.get("VLM_DEBUG", "") not in ("", "0")
    from vlm.core.quiet import silence_third_party_warnings

    silence_third_party_warnings()
    try:
        args.func(args)
    except TrainingPreempted as exc:  # not a failure: a checkpoint to resume from (exit 75, EX_TEMPFAIL)
        _close_progress_bars()
        sys.stderr.write(f"{error_line(exc)}\n")  # one write: under torchrun the ranks share stderr
        sys.stderr.flush()
        sys.exit(exc.exit_code)
    except (VLMError, OSError, UnicodeDecodeError) as exc:
        if debug:
            raise
        _close_progress_bars()
        print(f"error: {error_line(exc)}", file=sys.stderr)
        sys.exit(2)


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def error_line(exc: BaseException) -> str:
    """One line for an expected error: a VLMError's own message; an OSError with its path and
    what to do (disk full, permission...); an undecodable file with the byte offset."""
    if isinstance(exc, UnicodeDecodeError):
        exc = DataFormatError(f"not UTF-8 text at byte {exc.start}: {exc.reason}; re-save the file as UTF-8")
    if isinstance(exc, OSError) and not isinstance(exc, VLMError):
        from vlm.core.errors import describe_os_error

        return describe_os_error(exc)
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
