"""``vlm prefs generate``: a checkpoint, eval questions and a judge wired to the pair writer."""

from __future__ import annotations

from pathlib import Path

from vlm.checkpoint.pretrained import load_pretrained
from vlm.core.errors import ConfigError
from vlm.core.registry import closest
from vlm.data.formats import read_dataset
from vlm.evaluation.judges import JUDGES
from vlm.evaluation.preference_pairs import PairSettings, generate_pairs
from vlm.evaluation.tasks import TASKS
from vlm.modeling.processing import build_processor


def prefs_generate(cfg, args) -> dict:
    """Write ``args.out``'s pairs from ``args.checkpoint``'s sampled answers to the questions of
    ``cfg.evals[args.eval]``, scored by judge ``args.judge``; returns the counts."""
    if args.eval not in cfg.evals:
        raise ConfigError(f"--eval: the config has no evals entry '{args.eval}'{closest(args.eval, list(cfg.evals))}")
    if args.judge not in JUDGES:
        raise ConfigError(f"--judge: unknown judge '{args.judge}'{closest(args.judge, JUDGES.names())}; known: "
                          f"{', '.join(JUDGES.names())}")
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{flag}: must be at least 1, got {value}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")
    ev = cfg.evals[args.eval]
    model, tokenizer, model_cfg = load_pretrained(args.checkpoint, trust_remote_code=cfg.model.llm.trust_remote_code)
    processor = build_processor(model, tokenizer, model_cfg, ev.template, max_image_pixels=ev.max_image_pixels)
    task = TASKS.get(ev.task)
    samples = read_dataset(ev.data.format or task.data_format, image_token=processor.image_token,
                           **{**task.reader_defaults, **dict(ev.data.args)})
    if ev.data.max_samples:
        samples = samples[: ev.data.max_samples]
    settings = PairSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens or ev.max_new_tokens, batch_size=args.batch_size,
                            seed=args.seed)
    judge = JUDGES.get(args.judge).build(None, None)
    counts = generate_pairs(model, processor, samples, judge, Path(args.out), settings)
    return {"out": str(args.out), **counts}
