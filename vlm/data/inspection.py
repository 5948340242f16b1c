"""A stage's data reported: samples per source, skipped records and why, token lengths, a few rendered.

:func:`inspect_stage` reads every dataset entry of a stage one record at a time (a sharded
source shard by shard, as conversion does; no image is decoded) and tokenises each sample with the
stage's template. Token lengths count text tokens only; images are counted apart (their placeholder
tokens depend on the model). A record is *skipped* when a reader refuses it (a sharded source's
missing image member, bad metadata) or when it cannot be trained on (``too_long``: an image past
``max_length``; ``fully_masked``: no labelled token). :func:`render_sample` shows a sample as the
template lays it out, each labelled (trained-on) span between ``[[`` and ``]]``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Sequence

from vlm.data.convert import stage_records
from vlm.data.dataset import tokenize_for_training
from vlm.data.processor import IGNORE_INDEX, VLMProcessor
from vlm.data.shards import Skipped
from vlm.data.types import Sample

SKIPPED_SHOWN = 20  # skipped records listed by name (all are counted)


def render_sample(processor: VLMProcessor, sample: Sample) -> str:
    """The sample's tokens decoded as the template lays them out; each run of labelled tokens
    between ``[[`` and ``]]``, each image's placeholders as one image marker."""
    ids, labels = processor.tokenize(sample.turns)
    parts: List[str] = []
    run: List[int] = []
    run_labelled = False
    for token, label in zip(ids + [None], labels + [None]):
        labelled = label is not None and label != IGNORE_INDEX
        if token == processor.image_token_id or token is None or labelled != run_labelled:
            if run:
                text = processor.tokenizer.decode(run)
                parts.append(f"[[{text}]]" if run_labelled else text)
            run, run_labelled = [], labelled
        if token == processor.image_token_id:
            if not parts or parts[-1] != processor.image_token:
                parts.append(processor.image_token)
        elif token is not None:
            run.append(token)
    return "".join(parts)


def histogram(lengths: Sequence[int], bins: int = 10) -> List[Dict[str, int]]:
    """``bins`` equal-width bins over ``lengths``: ``{"from", "to", "count"}`` each (``to`` included)."""
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = Counter((n - low) // width for n in lengths)
    return [{"from": low + i * width, "to": low + (i + 1) * width - 1, "count": counts.get(i, 0)}
            for i in range(-(-(high - low + 1) // width))]


def inspect_stage(data_cfgs, processor: VLMProcessor, show: int = 3, bins: int = 10) -> Dict[str, Any]:
    """The report of a stage's data (``data_cfgs``: its ``data`` entries) tokenised by
    ``processor``: ``sources`` (format, samples, skipped, images, repeat per entry), ``skipped``
    (counts per reason, the first records by name), ``text_tokens`` (min, mean, max and a
    histogram), ``truncated`` and ``samples`` (the first ``show`` rendered)."""
    sources = [{"format": d.format, "samples": 0, "skipped": 0, "images": 0, "repeat": d.repeat} for d in data_cfgs]
    reasons: Counter = Counter()
    skipped: List[Dict[str, str]] = []
    lengths: List[int] = []
    rendered: List[str] = []
    truncated = 0
    for index, record in stage_records(data_cfgs, processor.image_token):
        if isinstance(record, Skipped):
            where, reason = record.where, record.reason
        else:
            ids, _, reason, cut = tokenize_for_training(processor, record)
            where = record.meta.get("source", record.id)
            truncated += cut
        if reason is not None:
            sources[index]["skipped"] += 1
            reasons[reason if len(reason) < 60 else reason.split(" (")[0]] += 1
            if len(skipped) < SKIPPED_SHOWN:
                skipped.append({"where": str(where), "reason": reason})
            continue
        sources[index]["samples"] += 1
        sources[index]["images"] += len(record.images)
        lengths.append(sum(1 for t in ids if t != processor.image_token_id))
        if len(rendered) < show:
            rendered.append(render_sample(processor, record))
    return {
        "sources": sources,
        "samples": sum(s["samples"] for s in sources),
        "skipped": {"total": sum(reasons.values()), "reasons": dict(reasons), "first": skipped},
        "text_tokens": {"min": min(lengths, default=0), "max": max(lengths, default=0),
                        "mean": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
                        "histogram": histogram(lengths, bins)},
        "truncated": truncated,
        "rendered": rendered,
    }
