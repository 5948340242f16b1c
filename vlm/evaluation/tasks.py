"""Evaluation tasks, by exact name: what an ``evals:`` entry's ``task`` can be.

A task declares the data format it reads (the default for the eval's ``data.format``), the
reader arguments it sets by default, its config checks (called when a config is validated) and
its run function. Register your own with ``@TASKS.register("name")`` in a plugin module::

    @TASKS.register("my_task")
    class MyTask(EvalTask):
        data_format = "jsonl"

        @classmethod
        def run(cls, model, processor, cfg, samples, out_dir, name):
            ...  # write f"{name}_results.json" under out_dir, return {"metric": value}

This module imports nothing heavy; each task imports what it runs on when it runs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Mapping, Optional

from vlm.core.errors import ConfigError, ImageLoadError
from vlm.core.registry import Registry

logger = logging.getLogger(__name__)

TASKS: Registry = Registry("task", {
    "caption": "vlm.evaluation.tasks:CaptionTask",
    "pope": "vlm.evaluation.tasks:PopeTask",
    "retrieval": "vlm.evaluation.tasks:RetrievalTask",
    "vqa": "vlm.evaluation.tasks:VQATask",
})


class EvalTask:
    """An evaluation task: a data format, config checks and a run function (class methods; a
    task holds no state)."""

    data_format: ClassVar[str] = ""
    # reader arguments set unless the config gives them (e.g. one sample per image)
    reader_defaults: ClassVar[Dict[str, object]] = {}
    # reader arguments the task cannot run without, each with why (checked by ``check``)
    required_args: ClassVar[Dict[str, str]] = {}
    # the component protocol (vlm.core.registry.Component): a task takes no options
    Options: ClassVar[Optional[type]] = None

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: None = None) -> "EvalTask":
        """The task (it holds no state and needs no context: an instance of its class methods)."""
        return cls()

    @classmethod
    def check(cls, ev, where: str) -> None:
        """Raise ConfigError for settings of ``ev`` (an ``EvalConfig``, at dotted key ``where``)
        this task cannot use. The default refuses ``rerank_k``, which is retrieval's, and a missing
        ``required_args`` entry."""
        if ev.rerank_k is not None:
            raise ConfigError(f"{where}.rerank_k: ITM re-ranking of the top k (k >= 1) applies to task "
                              f"'retrieval' only; got {ev.rerank_k} for task '{ev.task}'")
        for key, why in cls.required_args.items():
            if not ev.data.args.get(key):
                raise ConfigError(f"{where}.data.args.{key}: {why}")

    @classmethod
    def run(cls, model, processor, cfg, samples: List, out_dir: Path, name: str) -> Dict[str, float]:
        """Evaluate ``model`` on ``samples``; write ``{name}_results.json`` under ``out_dir`` and
        return the scores. Under several processes it runs on every rank; rank 0's return value
        is what the runner reports (the others may return None)."""
        raise NotImplementedError


def _generate(model, processor, cfg, samples, name):
    """``(samples, answers, skipped)``: the answers for the samples whose images could be read,
    and how many were skipped for unreadable images (an ImageLoadError when none could be). Under
    several processes each rank answers every world-th sample and every rank gets all answers."""
    from vlm.evaluation import distributed
    from vlm.inference.generation import generate_answers

    rank, world = distributed.rank_and_world()
    mine = distributed.shard_indices(len(samples), rank, world)  # each rank answers its share
    answers = generate_answers(model, processor, [samples[i] for i in mine], batch_size=cfg.batch_size,
                               skip_unreadable=True, max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams,
                               desc=f"eval {name}")
    answers = distributed.gather_in_order(mine, answers, len(samples))
    skipped = sum(a is None for a in answers)
    if samples and skipped == len(samples):
        raise ImageLoadError(f"eval {name}: none of the {len(samples)} images could be read (see the warnings); "
                             "check the eval's image_root")
    if skipped:
        logger.warning("eval %s: %d of %d samples skipped for unreadable images; scored the rest", name,
                       skipped, len(samples))
    kept = [(s, a) for s, a in zip(samples, answers) if a is not None]
    return [s for s, _ in kept], [a for _, a in kept], skipped


def _answer_and_write(model, processor, cfg, samples, out_dir: Path, name: str, row) -> Optional[tuple]:
    """Generate the answers (:func:`_generate`), then on the main process write
    ``{name}_results.json`` (``row(sample, answer)`` per answered sample) and return ``(results,
    skipped)``; None on the other ranks."""
    samples, answers, skipped = _generate(model, processor, cfg, samples, name)
    if not _is_main():
        return None  # rank 0 writes and scores (the runner broadcasts its scores)
    results = [row(s, a) for s, a in zip(samples, answers)]
    (out_dir / f"{name}_results.json").write_text(json.dumps(results, indent=1))
    return results, skipped


def _is_main() -> bool:
    from vlm.evaluation import distributed

    return distributed.is_main()


def _with_skips(scores: Dict[str, float], skipped: int) -> Dict[str, float]:
    return {**scores, "skipped_unreadable": skipped} if skipped else scores


class CaptionTask(EvalTask):
    """Captioning: results ``[{image_id, caption}]`` scored by pycocoevalcap (BLEU, METEOR,
    ROUGE-L, CIDEr) against the captions file."""

    data_format = "coco_captions"
    reader_defaults = {"per": "image"}

    @classmethod
    def run(cls, model, processor, cfg, samples, out_dir, name):
        from vlm.evaluation.caption_metric import score_captions

        done = _answer_and_write(model, processor, cfg, samples, out_dir, name,
                                 lambda s, a: {"image_id": s.meta["image_id"], "caption": a})
        if done is None:
            return None
        results, skipped = done
        return _with_skips(score_captions(cfg.data.args["path"], results), skipped)


class VQATask(EvalTask):
    """VQAv2: results ``[{question_id, answer}]`` scored by the official accuracy after EvalAI
    answer normalisation; per-question accuracies go to ``{name}_per_question.json``."""

    data_format = "vqav2"
    required_args = {"annotations_path": "a vqa eval needs the VQAv2 annotations file to score against"}

    @classmethod
    def run(cls, model, processor, cfg, samples, out_dir, name):
        from vlm.evaluation.vqa_metric import score_vqa

        done = _answer_and_write(model, processor, cfg, samples, out_dir, name,
                                 lambda s, a: {"question_id": s.meta["question_id"], "answer": a})
        if done is None:
            return None
        results, skipped = done
        args = cfg.data.args
        full = score_vqa(args["questions_path"], args["annotations_path"], results,
                         allow_missing=bool(cfg.data.max_samples) or skipped > 0)
        (out_dir / f"{name}_per_question.json").write_text(json.dumps(full["per_question"]))
        (out_dir / f"{name}_per_question_type.json").write_text(json.dumps(full["per_question_type"], indent=1))
        scores = {"accuracy": full["overall"], **{f"accuracy_{k}": v for k, v in full["per_answer_type"].items()}}
        return _with_skips(scores, skipped)


class RetrievalTask(EvalTask):
    """Image<->text recall@1/5/10 of a model whose connector has image-text heads (the
    Q-Former; ``vlm/evaluation/retrieval.py``), optionally re-ranked by ITM (``rerank_k``);
    results are each query's top 10."""

    data_format = "coco_captions"
    reader_defaults = {"per": "image"}

    @classmethod
    def check(cls, ev, where):
        if ev.rerank_k is not None and ev.rerank_k < 1:
            raise ConfigError(f"{where}.rerank_k: ITM re-ranking of the top k needs k >= 1, got {ev.rerank_k}")

    @classmethod
    def run(cls, model, processor, cfg, samples, out_dir, name):
        from vlm.evaluation.retrieval import evaluate_retrieval

        scores, results = evaluate_retrieval(model, processor.load_image, samples, cfg.rerank_k,
                                             batch_size=cfg.batch_size, desc=f"eval {name}")
        if _is_main():  # every rank ranks everything; one writes
            (out_dir / f"{name}_results.json").write_text(json.dumps(results, indent=1))
        return scores


class PopeTask(EvalTask):
    """POPE object hallucination: yes/no "Is there a {object} in the image?" questions built from
    instance or caption annotations (``vlm.data.pope``); per split, the official script's
    accuracy, precision, recall, F1 and yes-ratio, in percent (``adversarial_f1``, ...); results
    ``[{question_id, split, image_id, object, label, answer}]``."""

    data_format = "pope"
    required_args = {"annotations": "a pope eval needs a COCO instances (or, with source: captions, a COCO "
                                    "captions) file to build its questions from"}

    @classmethod
    def run(cls, model, processor, cfg, samples, out_dir, name):
        from vlm.evaluation.pope_metric import score_pope_splits

        done = _answer_and_write(model, processor, cfg, samples, out_dir, name, lambda s, a: {
            "question_id": s.meta["question_id"], "split": s.meta["split"], "image_id": s.meta["image_id"],
            "object": s.meta["object"], "label": s.meta["label"], "answer": a})
        if done is None:
            return None
        results, skipped = done
        return _with_skips(score_pope_splits(results), skipped)
