"""Batched generation over Samples: left-padded prompts in, decoded answers out."""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from vlm.data.processor import VLMProcessor, pad_batch
from vlm.data.types import Sample
from vlm.errors import ImageLoadError

logger = logging.getLogger(__name__)


def stop_settings(processor: VLMProcessor) -> Dict:
    """``eos_token_id`` (eos plus single-token stop strings) and, if needed, ``stop_strings``."""
    tokenizer = processor.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    multi = []
    for text in processor.template.stop_strings():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            eos.append(ids[0])
        else:
            multi.append(text)
    settings: Dict = {"eos_token_id": sorted(set(eos)), "pad_token_id": tokenizer.pad_token_id}
    if multi:
        settings.update(stop_strings=multi, tokenizer=tokenizer)
    return settings


def clean_answer(text: str, stops: Sequence[str]) -> str:
    """Cut at the first stop string and strip whitespace."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


@torch.no_grad()
def generate_answers(model, processor: VLMProcessor, samples: Sequence[Sample], *, batch_size: int = 16,
                     max_new_tokens: int = 32, num_beams: int = 1, desc: str = "generate",
                     skip_unreadable: bool = False, **generation_kwargs) -> List[Optional[str]]:
    """One decoded answer per sample (greedy unless told otherwise), in order. With
    ``skip_unreadable``, a sample whose image cannot be read gets None instead of an error."""
    model.eval()
    device = next(model.parameters()).device
    settings = stop_settings(processor)
    settings.update(generation_kwargs)
    settings.setdefault("do_sample", False)
    stops = processor.template.stop_strings()
    answers: List[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        encoded = [_encode(processor, s, skip_unreadable) for s in samples[start:start + batch_size]]
        if not any(encoded):
            answers.extend([None] * len(encoded))
            continue
        batch = pad_batch([e for e in encoded if e is not None], processor.tokenizer.pad_token_id,
                          padding_side="left")
        pixel_values = batch["pixel_values"].to(device) if batch["pixel_values"] is not None else None
        new_tokens = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    pixel_values, instructions=batch["instructions"],
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, **settings)
        texts = iter(processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        answers.extend(None if e is None else clean_answer(next(texts), stops) for e in encoded)
    return answers


def _encode(processor: VLMProcessor, sample: Sample, skip_unreadable: bool) -> Optional[Dict]:
    try:
        return processor.encode(sample, for_generation=True)
    except ImageLoadError as exc:
        if not skip_unreadable:
            raise
        logger.warning("skipping %s: %s", sample.meta.get("source", sample.id), exc)
        return None
