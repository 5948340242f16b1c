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
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlm.core.errors import ImageLoadError
from vlm.data.batch import EncodedSample
from vlm.data.image_cache import DecodedImageCache
from vlm.data.images import unless_unreadable
from vlm.data.processor import IGNORE_INDEX, VLMProcessor, image_instructions
from vlm.data.types import Sample
from vlm.data.visuals import load_visuals

logger = logging.getLogger(__name__)


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
        self.frame_counts: Dict[int, List[int]] = {}  # entry index -> its videos' frame counts
        truncated: List[str] = []
        for sample in tqdm(samples, desc=f"tokenizing {name}", disable=not progress, leave=False):
            counts = video_frame_counts(processor, sample, image_features is not None)
            if isinstance(counts, str):
                self.stats[counts] += 1
                self.left_out.setdefault(counts, []).append(sample.meta.get("source", sample.id))
                continue
            ids, labels = processor.tokenize(sample.turns, frame_counts=counts)
            reason = None
            if len(ids) > processor.max_length:
                if processor.image_token_id in ids[processor.max_length:]:
                    reason = "too_long"
                else:
                    ids, labels = ids[: processor.max_length], labels[: processor.max_length]
                    self.stats["truncated"] += 1
                    truncated.append(sample.meta.get("source", sample.id))
            if reason is None and all(label == IGNORE_INDEX for label in labels):
                reason = "fully_masked"
            if reason:
                self.stats[reason] += 1
                self.left_out.setdefault(reason, []).append(sample.meta.get("source", sample.id))
                continue
            if counts:
                self.frame_counts[len(self.entries)] = counts
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
        if sample.videos:
            return self._with_videos(sample, ids, labels, self.frame_counts[index])
        load, kind = ((self.load_image, "pixels") if self.image_features is None
                      else (self.image_features, "features"))
        images = unless_unreadable(lambda: [load(path) for path in sample.images], sample, where=self.name)
        if images is None:
            self.image_failures += 1
            return None
        return EncodedSample(ids, labels, images, image_instructions(sample.turns, self.processor.image_token), kind)

    def _with_videos(self, sample: Sample, ids: List[int], labels: List[int],
                     counts: List[int]) -> Optional[EncodedSample]:
        """A sample with videos: its images and sampled frames in marker order (pixels)."""
        visuals = unless_unreadable(
            lambda: load_visuals(sample.turns, sample.images, sample.videos, self.processor.image_token,
                                 self.load_image, self.processor.load_video), sample, where=self.name)
        if visuals is not None and visuals.frame_counts != counts:
            logger.warning("%s: skipping sample %s: its videos gave %s frames, %s when it was tokenised", self.name,
                           sample.meta.get("source", sample.id), visuals.frame_counts, counts)
            visuals = None
        if visuals is None:
            self.image_failures += 1
            return None
        return EncodedSample(ids, labels, visuals.tensors, visuals.instructions, frames=visuals.frames)


def video_frame_counts(processor: VLMProcessor, sample: Sample, features: bool = False) -> "List[int] | str":
    """The frame count of each of ``sample``'s videos, or the reason it is left out (logged
    with the sample's source): ``unreadable_video`` (including 0 frames) or
    ``video_without_pixels`` (the frozen-feature cache holds images only)."""
    if not sample.videos:
        return []
    if features:
        return "video_without_pixels"
    try:
        return processor.frame_counts(sample)
    except ImageLoadError as exc:
        logger.warning("skipping sample %s: %s", sample.meta.get("source", sample.id), exc)
        return "unreadable_video"
