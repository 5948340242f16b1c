"""The ``vlm`` command: train, run recipes, evaluate, score, generate data, chat, benchmark, list models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from vlm.config import ConfigError


def _load(args, out_required: bool = False):
    from vlm.config import load_config

    defaults = {"out_dir": args.out} if getattr(args, "out", None) else {}
    if out_required and not defaults:
        raise ConfigError("--out DIR is required")
    return load_config(args.config, args.overrides, **defaults)


def cmd_train(args) -> None:
    """Train the config's stages (or one, with --stage) without running its evaluations."""
    from vlm.pipeline import run_stage

    cfg = _load(args)
    names = [args.stage] if args.stage else list(cfg.stages)
    for name in names:
        if name not in cfg.stages:
            raise ConfigError(f"--stage: no stage '{name}' in {args.config}; stages: {list(cfg.stages)}")
        print(f"{name}: {run_stage(cfg, name, resume=args.resume)}")


def cmd_run(args) -> None:
    """Run a recipe end to end and write OUT/metrics.json."""
    from vlm.recipes import run_recipe

    run_recipe(_load(args, out_required=True), resume=args.resume)


RETRIEVAL_FLAGS = ("captions", "image_root", "rerank_k", "batch_size", "max_samples")


def cmd_eval(args) -> None:
    """Run the config's evaluations on a checkpoint, or `vlm eval retrieval` on a captions file."""
    from vlm.recipes import format_table, run_evals

    if args.config == "retrieval":
        metrics = {"retrieval": _eval_retrieval(args)}
    else:
        given = [f"--{f.replace('_', '-')}" for f in RETRIEVAL_FLAGS if getattr(args, f) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: only for `vlm eval retrieval`; a config's evals take "
                              "their settings from the config")
        metrics = run_evals(_load(args), checkpoint=args.checkpoint)
    print(format_table(metrics))
    print(json.dumps(metrics))


def _eval_retrieval(args) -> dict:
    """`vlm eval retrieval --checkpoint DIR --captions FILE`: recall@1/5/10 of a Q-Former model."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from vlm.config import EvalConfig
    from vlm.evaluation.runner import run_eval
    from vlm.pipeline import build_processor, load_pretrained

    if args.overrides:
        raise ConfigError(f"vlm eval retrieval takes no overrides, got {args.overrides}")
    if not args.checkpoint or not args.captions:
        raise ConfigError("vlm eval retrieval needs --checkpoint (a stage output) and --captions (a COCO captions file)")
    if args.rerank_k is not None and args.rerank_k < 1:
        raise ConfigError(f"--rerank-k: must be at least 1, got {args.rerank_k}")
    cfg = OmegaConf.structured(EvalConfig)
    cfg.task = "retrieval"
    cfg.data.format = "coco_captions"
    cfg.data.args = {"path": args.captions, **({"image_root": args.image_root} if args.image_root else {})}
    cfg.data.max_samples = args.max_samples
    cfg.rerank_k = args.rerank_k
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    model, tokenizer, model_cfg = load_pretrained(args.checkpoint)
    processor = build_processor(model, tokenizer, model_cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    return run_eval(model, processor, cfg, out, "retrieval")


def cmd_score(args) -> None:
    """Score official-format result files and print one JSON object."""
    if args.task == "caption":
        from vlm.evaluation.caption_metric import score_captions

        scores = score_captions(args.annotations, args.results, spice=args.spice)
    else:
        from vlm.evaluation.vqa_metric import score_vqa

        if not args.questions:
            raise ConfigError("vlm score vqa needs --questions")
        scores = score_vqa(args.questions, args.annotations, args.results)
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

    colors = tuple(c.strip() for c in args.colors.split(",")) if args.colors else None
    style = ShapesStyle(shape_scale=args.shape_scale, jitter=args.jitter, shapes_per_image=args.shapes_per_image,
                        background=args.background, colors=colors, phrasing=args.phrasing)
    try:
        style.check()
    except ValueError as exc:
        raise ConfigError(f"vlm data shapes: {exc}") from None
    paths = generate_shapes(args.out, num_train=args.num_train, num_test=args.num_test,
                            image_size=args.image_size, seed=args.seed, style=style)
    print(json.dumps(paths, indent=2, default=str))


def cmd_chat(args) -> None:
    """Ask a trained model about an image: one prompt, or an interactive loop."""
    from vlm.chat import chat

    chat(args.checkpoint, args.image, args.prompt, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature, template=args.template, use_task_prompt=not args.no_task_prompt)


def cmd_bench_feature_cache(args) -> None:
    """Train a stage with its frozen encoder running and from the feature cache; print samples/s."""
    from vlm.bench import bench_feature_cache

    result = bench_feature_cache(_load(args), args.stage, steps=args.steps, warmup=args.warmup,
                                 repeats=args.repeats, prepare=args.prepare)
    print(json.dumps({"config": args.config, **result}, indent=2))


def _require_registered(registry, name: str, flag: str) -> None:
    """ConfigError naming ``flag`` (with the registry's "did you mean") when ``name`` is unknown."""
    try:
        registry.get(name)
    except KeyError as exc:
        raise ConfigError(f"{flag}: {exc.args[0]}") from None


def cmd_export_hf_llava(args) -> None:
    """Write a stage output as a transformers LLaVA folder (LlavaForConditionalGeneration)."""
    from vlm.interop.hf_llava import LlavaLayoutError, export_hf_llava

    try:
        print(f"exported: {export_hf_llava(args.checkpoint, args.out)}")
    except LlavaLayoutError as exc:
        raise ConfigError(f"{args.checkpoint}: {exc}") from None


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
                              preprocess=args.preprocess)
    except LlavaLayoutError as exc:
        raise ConfigError(str(exc)) from None
    print(f"imported: {out} (vlm chat {out} --image IMG, or init_from: {out} with model.vision.pretrained: "
          f"{out}/vision and model.llm.name_or_path: {out}/llm)")


def cmd_models(args) -> None:
    """List the registered vision encoders, connectors, templates and data formats."""
    from vlm.catalog import catalog

    entries = catalog()
    if args.json:
        print(json.dumps(entries, indent=2))
        return
    for kind, names in entries.items():
        print(f"{kind}: {', '.join(names)}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``vlm`` command."""
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, out_help="output folder (sets out_dir)"):
        p.add_argument("config", help="YAML config")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.align.batch_size=16")
        p.add_argument("--out", help=out_help)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    with_config(p)
    p.add_argument("--stage", help="train only this stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help=cmd_run.__doc__)
    with_config(p)
    p.add_argument("--resume", action="store_true", help="resume each stage from its latest checkpoint")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help=cmd_eval.__doc__,
                       description="vlm eval CONFIG [overrides] [--checkpoint DIR]: the config's evals. "
                                   "vlm eval retrieval --checkpoint DIR --captions FILE [--image-root DIR] "
                                   "[--rerank-k K]: image-text retrieval of a Q-Former model.")
    with_config(p, out_help="output folder (sets out_dir); retrieval: where retrieval_results.json goes "
                            "(default: beside the checkpoint, in eval/)")
    p.add_argument("--checkpoint", help="stage output folder to evaluate (default: the last stage's final)")
    p.add_argument("--captions", help="retrieval: COCO captions file (official or Karpathy)")
    p.add_argument("--image-root", help="retrieval: folder the captions file's image paths are relative to")
    p.add_argument("--rerank-k", type=int, help="retrieval: re-rank each query's k best with the ITM head")
    p.add_argument("--batch-size", type=int, help="retrieval: encoding batch size (default 16)")
    p.add_argument("--max-samples", type=int, help="retrieval: only the first N images")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help=cmd_score.__doc__)
    p.add_argument("task", choices=["caption", "vqa"])
    p.add_argument("--annotations", required=True, help="COCO captions JSON, or VQAv2 annotations JSON")
    p.add_argument("--results", required=True, help="results JSON in the official format")
    p.add_argument("--questions", help="VQAv2 questions JSON (vqa only)")
    p.add_argument("--spice", action="store_true", help="also compute SPICE (needs CoreNLP; not offline)")
    p.add_argument("--details", action="store_true", help="print every question's score too (vqa: per_question)")
    p.add_argument("--details-out", help="write the full scores, per-question detail included, to this JSON file")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("data", help="generate datasets")
    data_sub = p.add_subparsers(dest="dataset", required=True)
    s = data_sub.add_parser("shapes", help=cmd_data_shapes.__doc__)
    s.add_argument("--out", required=True)
    s.add_argument("--num-train", type=int, default=2000)
    s.add_argument("--num-test", type=int, default=200)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shape-scale", type=float, default=1.0, help="multiply the shapes' sizes (0.3-1.6)")
    s.add_argument("--jitter", type=float, default=0.05, help="largest shift of a shape's centre, fraction of the side")
    s.add_argument("--shapes-per-image", type=int, default=1, choices=[1, 2],
                   help="2: a shape in each half; questions name which ('the shape on the left')")
    s.add_argument("--background", default="solid", choices=["solid", "noise", "gradient"])
    s.add_argument("--colors", help="comma-separated colour names to draw from (default: the six demo colours; "
                                    "also pink, brown, cyan, gray, black, white, lime, navy)")
    s.add_argument("--phrasing", default="default", choices=["default", "alt"], help="question wordings")
    s.set_defaults(func=cmd_data_shapes)

    p = sub.add_parser("chat", help=cmd_chat.__doc__)
    p.add_argument("checkpoint", help="stage output folder (e.g. runs/demo/instruct/final)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", help="one question; without it, an interactive loop")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--template", help="chat template (default: the model's)")
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

    p = sub.add_parser("export", help="write a trained model in another library's format")
    export_sub = p.add_subparsers(dest="format", required=True)
    s = export_sub.add_parser("hf-llava", help=cmd_export_hf_llava.__doc__)
    s.add_argument("checkpoint", help="stage output folder (hf_clip + mlp2x_gelu + a causal LM)")
    s.add_argument("--out", required=True, help="folder to write (LlavaForConditionalGeneration.from_pretrained reads it)")
    s.set_defaults(func=cmd_export_hf_llava)

    p = sub.add_parser("import", help="turn another library's model into a vlm stage output")
    import_sub = p.add_subparsers(dest="format", required=True)
    s = import_sub.add_parser("hf-llava", help=cmd_import_hf_llava.__doc__)
    s.add_argument("folder", help="local transformers LLaVA folder (config.json, safetensors, tokenizer)")
    s.add_argument("--out", required=True, help="stage output folder to write")
    s.add_argument("--template", default="vicuna_v1", help="chat template it was trained with (LLaVA-1.5: vicuna_v1)")
    s.add_argument("--preprocess", default="pad", help="image preprocessing it was trained with (LLaVA-1.5: pad)")
    s.add_argument("--image-token", default="<image>", help="the tokenizer's image placeholder token")
    s.set_defaults(func=cmd_import_hf_llava)

    p = sub.add_parser("models", help=cmd_models.__doc__)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``vlm`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`vlm train C --out D a.b=c`): argparse leaves them over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from vlm.quiet import silence_third_party_warnings

    silence_third_party_warnings()
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
