"""Run an evaluation from its config: generate, write official result files, score them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

from vlm.config import EvalConfig
from vlm.data.formats import read_dataset
from vlm.evaluation import distributed
from vlm.evaluation.caption_metric import score_captions
from vlm.evaluation.generation import generate_answers
from vlm.evaluation.vqa_metric import score_vqa

logger = logging.getLogger(__name__)


def run_eval(model, processor, cfg: EvalConfig, out_dir: str | Path, name: str = "eval") -> Dict[str, float]:
    """Evaluate ``model`` as ``cfg`` says; writes ``{name}_results.json`` and returns the scores.

    ``caption``: results ``[{image_id, caption}]`` scored by pycocoevalcap (BLEU, METEOR,
    ROUGE-L, CIDEr). ``vqa``: results ``[{question_id, answer}]`` scored by the official VQAv2
    accuracy after EvalAI answer normalisation. ``retrieval``: image<->text recall@1/5/10 of a
    Q-Former model (``vlm/evaluation/retrieval.py``); results are each query's top 10.

    Under several processes, each rank generates for its share of the samples; rank 0 writes
    the files and scores them; every rank returns rank 0's scores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = dict(cfg.data.args)
    if cfg.task in ("caption", "retrieval"):
        args.setdefault("per", "image")
    samples = read_dataset(cfg.data.format, **args)
    if cfg.data.max_samples:
        samples = samples[: cfg.data.max_samples]
    if cfg.task == "retrieval":
        from vlm.evaluation.retrieval import evaluate_retrieval

        scores, results = evaluate_retrieval(model, processor.load_image, samples, cfg.rerank_k,
                                             batch_size=cfg.batch_size, desc=f"eval {name}")
        if distributed.is_main():  # every rank ranks everything; one writes
            (out_dir / f"{name}_results.json").write_text(json.dumps(results, indent=1))
        logger.info("%s: %s", name, scores)
        return scores
    rank, world = distributed.rank_and_world()
    mine = distributed.shard_indices(len(samples), rank, world)
    answers = generate_answers(model, processor, [samples[i] for i in mine], batch_size=cfg.batch_size,
                               max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, desc=f"eval {name}")
    answers = distributed.gather_in_order(mine, answers, len(samples))
    if rank != 0:
        return distributed.broadcast_from_main(None)
    scores = _write_and_score(cfg, args, samples, answers, out_dir, name)
    return distributed.broadcast_from_main(scores)


def _write_and_score(cfg: EvalConfig, args: dict, samples, answers, out_dir: Path, name: str) -> Dict[str, float]:
    results_path = out_dir / f"{name}_results.json"
    if cfg.task == "caption":
        results = [{"image_id": s.meta["image_id"], "caption": a} for s, a in zip(samples, answers)]
        results_path.write_text(json.dumps(results, indent=1))
        scores = score_captions(args["path"], results)
    else:
        results = [{"question_id": s.meta["question_id"], "answer": a} for s, a in zip(samples, answers)]
        results_path.write_text(json.dumps(results, indent=1))
        full = score_vqa(args["questions_path"], args["annotations_path"], results,
                         allow_missing=bool(cfg.data.max_samples))
        (out_dir / f"{name}_per_question.json").write_text(json.dumps(full["per_question"]))
        scores = {"accuracy": full["overall"],
                  **{f"accuracy_{k}": v for k, v in full["per_answer_type"].items()}}
    logger.info("%s: %s", name, scores)
    return scores
