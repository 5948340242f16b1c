"""``vlm prefs generate``: preference pairs from a model's own sampled answers, scored by a judge.

For every question, ``n`` answers are sampled (temperature, top-p) through the eval generation
path, a judge (:mod:`vlm.evaluation.judges`) scores each, and the best answer becomes ``chosen``
and the lowest-scoring different one ``rejected``, with both scores; a question whose answers
all score the same gives no pair and is counted. The output is ``format: preference_json``
(layout ``native``). Questions are done in chunks of ``batch_size``, each chunk's sampling seeded
by ``seed`` and its index; finished chunks are appended to ``OUT.partial`` (JSON lines), so an
interrupted run continues where it stopped and writes the same pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from vlm.data.types import Sample
from vlm.evaluation.judges import Judge
from vlm.inference.generation import generate_answers

_SPEAKER = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass
class PairSettings:
    """How answers are sampled: ``n`` per question, ``temperature``, ``top_p``, ``max_new_tokens``;
    ``batch_size`` questions per chunk; ``seed`` of the chunks' sampling."""

    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 16
    batch_size: int = 16
    seed: int = 0


def choose_pair(answers: Sequence[str], scores: Sequence[float]) -> Optional[Tuple[int, int]]:
    """``(best, worse)`` indices: the first best-scoring answer, and the lowest-scoring answer
    whose text differs from it and whose score is lower; None when there is no such answer."""
    best = max(range(len(answers)), key=lambda i: scores[i])
    worse = [i for i in range(len(answers)) if scores[i] < scores[best] and answers[i].strip() != answers[best].strip()
             and answers[i].strip()]
    if not answers[best].strip() or not worse:
        return None
    return best, min(worse, key=lambda i: scores[i])


def _record(sample: Sample, index: int, answers: Sequence[str], scores: Sequence[float]) -> dict:
    pair = choose_pair(answers, scores)
    if pair is None:
        return {"index": index, "skipped": True}
    best, worse = pair
    prompt = list(sample.turns)
    while prompt and prompt[-1].role == "assistant":  # the reference answer, if the reader kept it
        prompt.pop()
    return {"index": index, "id": sample.id, "image": list(sample.images),
            "conversations": [{"from": _SPEAKER[t.role], "value": t.content} for t in prompt],
            "chosen": answers[best], "rejected": answers[worse],
            "scores": {"chosen": float(scores[best]), "rejected": float(scores[worse])}}


def _done(partial: Path) -> Dict[int, dict]:
    if not partial.exists():
        return {}
    records = {}
    for line in partial.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["index"]] = record
    return records


def generate_pairs(model, processor, samples: Sequence[Sample], judge: Judge, out: Path,
                   settings: PairSettings, progress: bool = True) -> Dict[str, int]:
    """Write preference pairs for ``samples`` to ``out`` (see the module); returns the counts
    ``pairs``, ``skipped`` (every answer scored the same) and ``resumed`` (questions read back
    from ``OUT.partial``)."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    done = _done(partial)
    resumed = sum(1 for i in done if i < len(samples))
    chunks = range(0, len(samples), settings.batch_size)
    with open(partial, "a") as log:
        for number, start in enumerate(tqdm(chunks, desc="prefs generate", disable=not progress)):
            chunk = range(start, min(start + settings.batch_size, len(samples)))
            if all(i in done for i in chunk):
                continue
            torch.manual_seed(settings.seed * 1_000_003 + number)
            repeated = [samples[i] for i in chunk for _ in range(settings.n)]
            answers = generate_answers(model, processor, repeated, batch_size=len(repeated),
                                       max_new_tokens=settings.max_new_tokens, do_sample=True,
                                       temperature=settings.temperature, top_p=settings.top_p, desc="sample")
            for k, i in enumerate(chunk):
                mine = [a or "" for a in answers[k * settings.n:(k + 1) * settings.n]]
                done[i] = _record(samples[i], i, mine, judge.score(samples[i], mine))
                log.write(json.dumps(done[i]) + "\n")
            log.flush()
    pairs: List[dict] = []
    for i in range(len(samples)):
        record = done[i]
        if not record.get("skipped"):
            pairs.append({k: v for k, v in record.items() if k != "index"})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(pairs, indent=1))
    os.replace(tmp, out)
    partial.unlink()
    return {"pairs": len(pairs), "skipped": len(samples) - len(pairs), "resumed": resumed}
