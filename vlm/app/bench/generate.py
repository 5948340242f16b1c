"""``vlm bench generate ... --against hf``: eval generation of vlm against transformers.

The prompts are one evaluation of the recipe (default ``vqa``): the same samples, batch size,
``max_new_tokens`` and stop tokens as ``vlm eval``. vlm side: :func:`generate_answers` (the
lean greedy decode). transformers side: the same model as a ``LlavaForConditionalGeneration``
(:func:`vlm.interop.hf_llava.to_hf_llava`) and its ``generate(do_sample=False)`` on the same
left-padded batches. Both include prompt encoding (image loading) and decoding to text; they
alternate pass by pass, medians are reported, and every answer is compared.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from vlm.app.env import environment
from vlm.core.errors import ConfigError


def _recipe_and_model(target: str, overrides: Sequence[str], out: Optional[str], prepare: bool):
    """``(cfg, model, tokenizer, model_cfg, weights)`` for a recipe YAML or a stage output folder."""
    from vlm.app.recipes import run_prepare
    from vlm.app.wiring import load_run_config as load_config
    from vlm.checkpoint.pretrained import load_pretrained, load_stage_tokenizer
    from vlm.modeling.build import build_model

    path = Path(target)
    if path.is_dir():
        recipe = path.parent / "config.yaml"  # <out_dir>/<stage>/final: the stage wrote its recipe beside it
        if not recipe.is_file():
            raise ConfigError(f"{target}: no config.yaml beside this stage output to read the eval prompts from")
        cfg = load_config(recipe, list(overrides))
        model, tokenizer, model_cfg = load_pretrained(path)
        return cfg, model, tokenizer, model_cfg, str(path)
    defaults = {"out_dir": out} if out else {}
    cfg = load_config(target, list(overrides), **defaults)
    if prepare:
        run_prepare(cfg)
    final = Path(cfg.out_dir) / list(cfg.stages)[-1] / "final"
    if final.is_dir():
        model, tokenizer, model_cfg = load_pretrained(final)
        return cfg, model, tokenizer, model_cfg, str(final)
    torch.manual_seed(0)
    tokenizer = load_stage_tokenizer(cfg.model, None)
    model = build_model(cfg.model, tokenizer).eval()
    return cfg, model, tokenizer, cfg.model, "random (no trained checkpoint at " + str(final) + ")"


def _hf_answers(llava, processor, samples, batch_size: int, max_new_tokens: int, settings: dict):
    """transformers' greedy generate on left-padded batches: ``(answers, new tokens)``."""
    from vlm.data.batch import Collator
    from vlm.inference.generation import clean_answer

    stops = processor.template.stop_strings()
    answers, tokens, rows = [], 0, []
    device = next(llava.parameters()).device
    collate = Collator(processor.tokenizer.pad_token_id, padding_side="left")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = collate([processor.encode(s, for_generation=True) for s in chunk]).to(device)
        with torch.no_grad():
            out = llava.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 pixel_values=batch.images, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, **settings)
        new = out[:, batch.input_ids.shape[1]:]
        tokens += _generated_tokens(new, settings["pad_token_id"], settings["eos_token_id"])
        rows += _trimmed(new, settings["pad_token_id"], settings["eos_token_id"])
        texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        answers.extend(clean_answer(t, stops) for t in texts)
    return answers, tokens, rows


def _trimmed(new: torch.Tensor, pad_id: int, eos_ids: Sequence[int]) -> List[List[int]]:
    """Each row's generated ids up to and including its first stop token."""
    rows = []
    for row in new.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        rows.append(row[:cut])
    return rows


def _generated_tokens(new: torch.Tensor, pad_id: int, eos_ids: Sequence[int]) -> int:
    """Tokens each row generated, up to and including its first stop token."""
    stops = torch.isin(new, torch.tensor(list(eos_ids), dtype=new.dtype, device=new.device))
    total = 0
    for row, stop in zip(new, stops):
        hit = stop.nonzero()
        total += int(hit[0]) + 1 if len(hit) else int(row.shape[0])
    return total


def bench_generate(target: str, eval_name: str = "vqa", overrides: Sequence[str] = (), repeats: int = 3,
                   limit: Optional[int] = None, prepare: bool = False, out: Optional[str] = None) -> dict:
    """Answer the eval's prompts ``repeats`` times with each side in turn; return tok/s,
    samples/s (medians), their ratio and whether every answer is identical."""
    from vlm.data.formats import read_dataset
    from vlm.evaluation.tasks import TASKS
    from vlm.inference.decode import greedy_decode
    from vlm.inference.generation import generate_answers, stop_settings
    from vlm.interop.hf_llava import to_hf_llava
    from vlm.modeling.processing import build_processor

    if repeats < 1:
        raise ConfigError("--repeats must be at least 1")
    cfg, model, tokenizer, model_cfg, weights = _recipe_and_model(target, overrides, out, prepare)
    if eval_name not in cfg.evals:
        raise ConfigError(f"--eval: no evaluation '{eval_name}'; evals: {list(cfg.evals)}")
    ev = cfg.evals[eval_name]
    task = TASKS.get(ev.task)
    args = {**task.reader_defaults, **dict(ev.data.args)}
    samples = read_dataset(ev.data.format or task.data_format, image_token=model_cfg.image_token, **args)
    samples = samples[: limit or ev.data.max_samples or len(samples)]
    processor = build_processor(model, tokenizer, model_cfg, ev.template)
    settings = stop_settings(processor)
    if "stop_strings" in settings:
        raise ConfigError(f"evals.{eval_name}: the template's multi-token stop strings use transformers' "
                          "generate on both sides; nothing to compare")
    llava = to_hf_llava(model).to(next(model.parameters()).device).eval()
    ours_t, theirs_t = [], []
    ours, theirs, ours_tokens, theirs_tokens, theirs_rows = [], [], 0, 0, []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = generate_answers(model, processor, samples, batch_size=ev.batch_size,
                                max_new_tokens=ev.max_new_tokens, desc="vlm")
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs, theirs_tokens, theirs_rows = _hf_answers(llava, processor, samples, ev.batch_size, ev.max_new_tokens, settings)
        theirs_t.append(time.perf_counter() - start)
    # vlm's generated token count (untimed): the same decode once more, counting
    from vlm.data.batch import Collator
    ours_rows: List[List[int]] = []
    collate = Collator(tokenizer.pad_token_id, padding_side="left")
    for s in range(0, len(samples), ev.batch_size):
        batch = collate([processor.encode(x, for_generation=True) for x in samples[s:s + ev.batch_size]])
        new = greedy_decode(model, batch.input_ids, batch.attention_mask, batch.images,
                            batch.instructions, max_new_tokens=ev.max_new_tokens,
                            eos_token_ids=settings["eos_token_id"], pad_token_id=settings["pad_token_id"])
        ours_tokens += _generated_tokens(new, settings["pad_token_id"], settings["eos_token_id"])
        ours_rows += _trimmed(new, settings["pad_token_id"], settings["eos_token_id"])
    o, t = statistics.median(ours_t), statistics.median(theirs_t)
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    return {
        "target": target, "eval": eval_name, "weights": weights, "samples": len(samples),
        "batch_size": ev.batch_size, "max_new_tokens": ev.max_new_tokens, "repeats": repeats,
        "env": environment(),
        "vlm": {"seconds": round(o, 3), "samples_per_s": round(len(samples) / o, 2),
                "tokens": ours_tokens, "tokens_per_s": round(ours_tokens / o, 1), "runs_s": [round(x, 3) for x in ours_t]},
        "transformers": {"seconds": round(t, 3), "samples_per_s": round(len(samples) / t, 2),
                         "tokens": theirs_tokens, "tokens_per_s": round(theirs_tokens / t, 1),
                         "runs_s": [round(x, 3) for x in theirs_t]},
        "ratio": round(t / o, 3),
        "answers_identical": not mismatches, "mismatches": len(mismatches),
        "tokens_identical": ours_rows == theirs_rows,
        "example": {"vlm": ours[0], "transformers": theirs[0]} if samples else None,
    }
