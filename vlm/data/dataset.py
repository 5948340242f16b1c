"""A map-style dataset of pre-tokenised conversations whose images load lazily.

Tokenising everything up front validates the data before training starts and finds the
samples that cannot be trained on: those whose labels are all masked and those whose image
placeholders do not fit in ``max_length``. Both are left out, counted and reported, never
silently trained on. An image that fails to load at training time is logged with its path and
the sample is dropped from its batch (and counted) instead of killing the run.

With ``image_features`` (the frozen-feature cache's reader), items carry each image's cached
encoder features instead of its pixels (``image_kind`` ``"features"``); a missing or
unreadable entry is handled like an unreadable image.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlm.data.batch import EncodedSample
from vlm.data.image_cache import DecodedImageCache
from vlm.data.images import unless_unreadable
from vlm.data.processor import IGNORE_INDEX, VLMProcessor, image_instructions
from vlm.data.types import Sample

logger = logging.getLogger(__name__)


def tokenize_for_training(processor: VLMProcessor, sample: Sample) -> Tuple[List[int], List[int], Optional[str], bool]:
    """``(ids, labels, reason, truncated)`` of one sample: ``reason`` is why it cannot be trained
    on (``too_long``: an image placeholder past ``max_length``; ``fully_masked``: no label), else
    None; ``truncated`` when its text was cut to ``max_length``."""
    ids, labels = processor.tokenize(sample.turns)
    truncated = False
    if len(ids) > processor.max_length:
        if processor.image_token_id in ids[processor.max_length:]:
            return ids, labels, "too_long", False
        ids, labels, truncated = ids[: processor.max_length], labels[: processor.max_length], True
    if all(label == IGNORE_INDEX for label in labels):
        return ids, labels, "fully_masked", truncated
    return ids, labels, None, truncated


class ConversationDataset(Dataset):
    """Samples tokenised by a processor; ``stats`` counts what was left out and why.

    Items are :class:`~vlm.data.batch.EncodedSample` (None for a sample whose image cannot be
    read). ``image_features(path)``, when given, returns an image's cached encoder features
    (raising ImageLoadError when it cannot); items then hold those (``image_kind``
    ``"features"``) instead of pixels. ``image_cache_bytes``, when given, keeps decoded images
    in memory up to that many bytes (:class:`~vlm.data.image_cache.DecodedImageCache`).
    """

    def __init__(self, samples: Sequence[Sample], processor: VLMProcessor, name: str = "data", progress: bool = True,
                 image_features: Optional[Callable[[str], torch.Tensor]] = None,
                 image_cache_bytes: Optional[int] = None):
        self.processor = processor
        self.image_features = image_features
        self.load_image = (processor.load_image if image_cache_bytes is None
                           else DecodedImageCache(processor.load_image, image_cache_bytes))
        self.name = name
        self.stats: Counter = Counter()
        self.left_out: Dict[str, List[str]] = {}
        self.entries: List[tuple] = []
        truncated: List[str] = []
        for sample in tqdm(samples, desc=f"tokenizing {name}", disable=not progress, leave=False):
            ids, labels, reason, was_truncated = tokenize_for_training(processor, sample)
            if was_truncated:
                self.stats["truncated"] += 1
                truncated.append(sample.meta.get("source", sample.id))
            if reason:
                self.stats[reason] += 1
                self.left_out.setdefault(reason, []).append(sample.meta.get("source", sample.id))
                continue
            self.entries.append((sample, ids, labels))
        self.stats["kept"] = len(self.entries)
        for reason, sources in self.left_out.items():
            logger.warning(
                "%s: %d sample(s) left out (%s), e.g. %s", name, len(sources), reason, ", ".join(sources[:3])
            )
        if truncated:
            logger.warning("%s: %d of %d sample(s) truncated to max_length %d (the end of their text is not "
                           "trained on), e.g. %s", name, len(truncated), len(samples), processor.max_length,
                           ", ".join(truncated[:3]))
        self.image_failures = 0  # in this process only; the trainer counts across workers (training/skips.py)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Optional[EncodedSample]:
        sample, ids, labels = self.entries[index]
        load, kind = ((self.load_image, "pixels") if self.image_features is None
                      else (self.image_features, "features"))
        images = unless_unreadable(lambda: [load(path) for path in sample.images], sample, where=self.name)
        if images is None:
            self.image_failures += 1
            return None
        return EncodedSample(ids, labels, images, image_instructions(sample.turns, self.processor.image_token), kind)
