"""A map-style dataset of pre-tokenised conversations whose images load lazily.

Tokenising everything up front validates the data before training starts and finds the
samples that cannot be trained on: those whose labels are all masked, those whose first image's
placeholders do not fit in ``max_length`` and those over the visual-token budget. They are left
out, counted and reported (naming the record), never silently trained on. A sample too long
for ``max_length`` is cut, never inside an image's tokens: after its last whole image
(:func:`whole_image_cut`; the images after the cut are dropped with the text). An image that
fails to load at training time is logged with its path and the sample is dropped from its
batch (and counted) instead of killing the run.

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

from vlm.core.errors import ImageLoadError
from vlm.data.batch import EncodedSample
from vlm.data.budget import OverBudget
from vlm.data.image_cache import DecodedImageCache
from vlm.data.images import unless_unreadable
from vlm.data.processor import IGNORE_INDEX, VLMProcessor, image_instructions
from vlm.data.types import Sample
from vlm.data.visuals import load_visuals

logger = logging.getLogger(__name__)


def tokenize_for_training(processor: VLMProcessor, sample: Sample) -> Tuple[List[int], List[int], Optional[str], bool]:
    """``(ids, labels, reason, truncated)`` of one streamed sample (K tokens per image: streaming
    stages take no AnyRes tiling): ``reason`` is why it cannot be trained on (``too_long``: an
    image placeholder past ``max_length``; ``fully_masked``: no label; ``video``: streamed
    sources take images only), else None; ``truncated`` when its text was cut to ``max_length``."""
    if sample.videos:
        return [], [], "video", False
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
    ``tokenize(samples)``, when given, returns every sample's ``(ids, labels)`` in its stead
    (:func:`vlm.data.token_cache.cached_tokenize`).
    """

    def __init__(self, samples: Sequence[Sample], processor: VLMProcessor, name: str = "data", progress: bool = True,
                 image_features: Optional[Callable[[str], torch.Tensor]] = None,
                 image_cache_bytes: Optional[int] = None,
                 tokenize: Optional[Callable[[Sequence[Sample]], Sequence[Tuple[List[int], List[int]]]]] = None):
        self.processor = processor
        self.image_features = image_features
        self.load_image = (processor.load_image if image_cache_bytes is None
                           else DecodedImageCache(processor.load_image, image_cache_bytes))
        self.name = name
        self.stats: Counter = Counter()
        self.left_out: Dict[str, List[str]] = {}
        self.entries: List[tuple] = []
        self.layouts: List[Optional[list]] = []  # AnyRes: each entry's images' TileLayouts
        self.num_images: List[int] = []  # each entry's images kept whole (a cut drops the ones after it)
        self.frame_counts: Dict[int, List[int]] = {}  # entry index -> its videos' frame counts
        truncated: List[str] = []
        # each image's and video's visual tokens first (AnyRes reads the images' sizes, videos are
        # decoded for their frame counts; the budget is checked)
        planned = []
        for sample in tqdm(samples, desc=f"planning images of {name}", leave=False,
                           disable=not progress or (processor.tiling is None and not any(s.videos for s in samples))):
            source = sample.meta.get("source", sample.id)
            try:  # the images first: with videos, their frames take what the images leave of the budget
                layouts = processor.image_layouts(sample.images, source, processor.budget_of(sample))
            except OverBudget as exc:
                self._leave_out("over_visual_budget", source, exc)
                continue
            except ImageLoadError as exc:  # AnyRes reads each image's size here
                self._leave_out("unreadable_image", source, exc)
                continue
            counts = processor.image_token_counts(layouts, len(sample.images))
            frames = video_frame_counts(processor, sample, image_features is not None, sum(counts))
            if isinstance(frames, str):
                self.stats[frames] += 1
                self.left_out.setdefault(frames, []).append(source)
                continue
            planned.append((sample, source, layouts, counts, frames))
        if tokenize is not None and processor.tiling is None and not any(p[4] for p in planned):
            encoded = tokenize([sample for sample, *_ in planned])  # the token cache (data/token_cache.py)
        else:  # tiled images' and videos' token counts depend on the files: not what the cache keys
            encoded = (processor.tokenize(sample.turns, image_tokens=counts, frame_counts=frames)
                       for sample, _, _, counts, frames in tqdm(planned, desc=f"tokenizing {name}",
                                                                disable=not progress, leave=False))
        for (sample, source, layouts, counts, frames), (ids, labels) in zip(planned, encoded):
            reason = None
            kept = len(sample.images)
            if len(ids) > processor.max_length:
                if frames:  # a video's frames are not cut apart: the text after the last one may be
                    cut = processor.max_length if processor.image_token_id not in ids[processor.max_length:] else 0
                    kept = kept if cut else 0
                else:
                    cut, kept = whole_image_cut(ids, processor.image_token_id, counts, processor.max_length)
                if cut == 0 or (kept == 0 and sample.images):
                    reason = "too_long"
                else:
                    ids, labels = ids[:cut], labels[:cut]
                    layouts = None if layouts is None else layouts[:kept]
                    self.stats["truncated"] += 1
                    truncated.append(source)
            if reason is None and all(label == IGNORE_INDEX for label in labels):
                reason = "fully_masked"
            if reason:
                self.stats[reason] += 1
                self.left_out.setdefault(reason, []).append(source)
                continue
            if frames:
                self.frame_counts[len(self.entries)] = frames
            self.entries.append((sample, ids, labels))
            self.layouts.append(layouts)
            self.num_images.append(kept)
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

    def _leave_out(self, reason: str, source: str, exc: Exception) -> None:
        """Count a sample left out for ``reason`` and log why (one line naming it)."""
        self.stats[reason] += 1
        self.left_out.setdefault(reason, []).append(source)
        logger.warning("%s: leaving out %s: %s", self.name, source, exc)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Optional[EncodedSample]:
        sample, ids, labels = self.entries[index]
        layouts = self.layouts[index]
        if sample.videos:
            return self._with_videos(sample, ids, labels, self.frame_counts[index], layouts)
        paths = sample.images[:self.num_images[index]]
        load, kind = ((self.load_image, "pixels") if self.image_features is None
                      else (self.image_features, "features"))
        if layouts is None:
            images = unless_unreadable(lambda: [load(path) for path in paths], sample, where=self.name)
        else:
            images = unless_unreadable(lambda: [self.processor.load_tiles(path, layout)
                                                for path, layout in zip(paths, layouts)], sample,
                                       where=self.name)
        if images is None:
            self.image_failures += 1
            return None
        instructions = image_instructions(sample.turns, self.processor.image_token)[:len(paths)]
        return EncodedSample(ids, labels, images, instructions, kind,
                             image_tokens=self.processor.image_token_counts(layouts, len(paths)),
                             image_layouts=layouts)

    def _with_videos(self, sample: Sample, ids: List[int], labels: List[int],
                     counts: List[int], layouts: Optional[list] = None) -> Optional[EncodedSample]:
        """A sample with videos: its images and sampled frames in marker order (pixels; with
        AnyRes tiling, their tiles and every entry's layout)."""
        order = None
        if layouts is not None:
            loaded = unless_unreadable(lambda: self.processor.load_tiled_visuals(
                sample.turns, sample.images, sample.videos, layouts, counts), sample, where=self.name)
            visuals, order = (None, None) if loaded is None else loaded
        else:
            planned = iter(counts)  # the budget may have lowered a video's frames

            def load_video(source):
                return self.processor.load_video(source, next(planned))

            visuals = unless_unreadable(
                lambda: load_visuals(sample.turns, sample.images, sample.videos, self.processor.image_token,
                                     self.load_image, load_video), sample, where=self.name)
        if visuals is not None and visuals.frame_counts != counts:
            logger.warning("%s: skipping sample %s: its videos gave %s frames, %s when it was tokenised", self.name,
                           sample.meta.get("source", sample.id), visuals.frame_counts, counts)
            visuals = None
        if visuals is None:
            self.image_failures += 1
            return None
        return EncodedSample(ids, labels, visuals.tensors, visuals.instructions, frames=visuals.frames,
                             image_layouts=order)


def video_frame_counts(processor: VLMProcessor, sample: Sample, features: bool = False,
                       image_tokens: Optional[int] = None) -> "List[int] | str":
    """The frame count of each of ``sample``'s videos, or the reason it is left out (logged
    with the sample's source): ``unreadable_video`` (including 0 frames), ``over_visual_budget``
    (one frame per video is still over ``max_visual_tokens``) or ``video_without_pixels`` (the
    frozen-feature cache holds images only)."""
    if not sample.videos:
        return []
    if features:
        return "video_without_pixels"
    try:
        return processor.frame_counts(sample, image_tokens)
    except ImageLoadError as exc:
        logger.warning("skipping sample %s: %s", sample.meta.get("source", sample.id), exc)
        return "unreadable_video"
    except OverBudget as exc:
        logger.warning("skipping sample %s: %s", sample.meta.get("source", sample.id), exc)
        return "over_visual_budget"


def whole_image_cut(ids: Sequence[int], image_token_id: int, counts: Sequence[int], max_length: int) -> tuple:
    """``(cut, kept)``: where to cut ``ids`` to at most ``max_length`` tokens without cutting
    through an image's placeholders (``counts``: each image's, in order), and how many images
    stay whole before the cut: ``max_length`` when every image ends within it, else the start
    of the first image that does not (or ``max_length``, if that comes first)."""
    positions = [i for i, token in enumerate(ids) if token == image_token_id]
    start = 0
    for kept, count in enumerate(counts):
        span = positions[start:start + count]
        if span and span[-1] >= max_length:
            return min(span[0], max_length), kept
        start += count
    return max_length, len(counts)
