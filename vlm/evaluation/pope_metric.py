"""The POPE metric: answers read the official way; accuracy, precision, recall, F1, yes-ratio.

Reproduces the official evaluation script (``evaluate.py`` of github.com/RUCAIBox/POPE): an answer
is cut at its first ".", its commas are removed, and it is split on single spaces; it reads "no"
when one of the words is exactly ``No``, ``no`` or ``not`` and "yes" otherwise (so "NO", "No."
after a first sentence, "nothing" or an empty answer read "yes"). A label is "no" or anything else
(yes). The scores are the script's fractions; where the script divides by zero (no "yes"
predicted, or no "yes" label) the score is 0.0 here instead of an error.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable, Mapping, Sequence

from vlm.core.errors import DataFormatError

POPE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def normalize_answer(text: str) -> str:
    """``"yes"`` or ``"no"``: the official script's reading of a free-form answer."""
    if "." in text:
        text = text.split(".")[0]  # only the first sentence
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def score_pope(labels: Sequence[str], answers: Sequence[str]) -> Dict[str, float]:
    """Scores of ``answers`` (free-form, normalised by :func:`normalize_answer`) against
    ``labels`` (``"yes"``/``"no"``), as the official script computes them: ``accuracy``,
    ``precision``, ``recall``, ``f1`` and ``yes_ratio`` (the share of answers read as yes) as
    fractions, and the counts ``tp``, ``fp``, ``tn``, ``fn``."""
    if len(labels) != len(answers):
        raise DataFormatError(f"POPE: {len(answers)} answers for {len(labels)} labels")
    if not labels:
        raise DataFormatError("POPE: no questions to score")
    preds = [normalize_answer(a) == "yes" for a in answers]
    truth = [label != "no" for label in labels]
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    tn = sum(not p and not t for p, t in zip(preds, truth))
    fn = sum(not p and t for p, t in zip(preds, truth))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {"accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": preds.count(True) / len(preds), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def score_pope_splits(results: Iterable[Mapping[str, str]]) -> Dict[str, float]:
    """Per split, in percent: ``{split}_{metric}`` for each of :data:`POPE_METRICS`, from
    records with ``split``, ``label`` and ``answer`` (splits in order of first appearance)."""
    by_split: Dict[str, list] = {}
    for r in results:
        by_split.setdefault(r["split"], []).append(r)
    scores: Dict[str, float] = {}
    for split, mine in by_split.items():
        full = score_pope([r["label"] for r in mine], [r["answer"] for r in mine])
        scores.update({f"{split}_{k}": 100.0 * full[k] for k in POPE_METRICS})
    return scores


def _read_jsonl(path: str, field: str) -> Dict[object, str]:
    """``{question_id: record[field]}`` of a JSON-lines file, each bad line named ``path:line``."""
    found: Dict[object, str] = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read: {e.strerror}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
        for key in ("question_id", field):
            if key not in record:
                raise DataFormatError(f"{path}:{lineno}: missing field '{key}'")
        if not isinstance(record[field], str):
            raise DataFormatError(f"{path}:{lineno}: field '{field}' has type {type(record[field]).__name__}")
        qid = record["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise DataFormatError(f"{path}:{lineno}: field 'question_id' has type {type(qid).__name__}")
        if qid in found:
            raise DataFormatError(f"{path}:{lineno}: duplicate question_id {qid!r}")
        found[qid] = record[field]
    if not found:
        raise DataFormatError(f"{path}: no records")
    return found


def score_pope_files(labels_path: str, answers_path: str) -> Dict[str, float]:
    """:func:`score_pope` of the official files: a question file (JSON lines with ``question_id``
    and ``label``, as POPE's ``coco_pope_*.json``) and an answer file (``question_id`` and
    ``answer`` per line), matched by ``question_id`` (the official script pairs them by line
    order); every question must have one answer and every answer a question."""
    labels = _read_jsonl(labels_path, "label")
    answers = _read_jsonl(answers_path, "answer")
    missing = [q for q in labels if q not in answers]
    extra = [q for q in answers if q not in labels]
    if missing or extra:
        raise DataFormatError(f"{answers_path}: unanswered questions of {labels_path}: {len(missing)} (first: "
                              f"{missing[:3]}); answers to no question: {len(extra)} (first: {extra[:3]})")
    return score_pope([labels[q] for q in labels], [answers[q] for q in labels])
