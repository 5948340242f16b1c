"""Preference pairs as batches: both answers of a pair in one forward, its images encoded once.

:class:`PairDataset` tokenises each pair (a :mod:`vlm.data.preference` Sample) twice, prompt +
chosen and prompt + rejected, labels only on the answer (the template's trainable tokens after the
generation prompt). :class:`PairCollator` lays a batch of B pairs out as 2B right-padded rows, the
B chosen rows first, then the B rejected rows in the same order; the batch carries each image
once and ``image_repeats = 2``, so that ``VisionLanguageModel.embed`` encodes it once and
scatters its visual tokens into both rows. Reference log-probabilities computed before training
(``reference``, ``(N, 2)``: chosen, rejected per pair) travel with the items they belong to.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vlm.core.errors import DataFormatError
from vlm.data.batch import IGNORE_INDEX, Batch
from vlm.data.images import unless_unreadable
from vlm.data.processor import VLMProcessor, image_instructions
from vlm.data.types import Sample, Turn

logger = logging.getLogger(__name__)


@dataclass
class EncodedPair:
    """One pair ready to batch: token ids and labels of prompt + chosen and of prompt + rejected,
    the images (once), their instructions, the pair's index in its dataset and, when
    precomputed, its reference log-probabilities ``(chosen, rejected)``."""

    chosen_ids: List[int]
    chosen_labels: List[int]
    rejected_ids: List[int]
    rejected_labels: List[int]
    images: List[torch.Tensor] = field(default_factory=list)
    instructions: List[str] = field(default_factory=list)
    index: int = 0
    reference: Optional[torch.Tensor] = None


@dataclass
class PreferenceBatch(Batch):
    """A :class:`Batch` of B pairs in 2B rows: chosen rows ``[:B]``, rejected rows ``[B:]``;
    ``images`` are the chosen rows' images, once (``image_repeats`` 2). ``indices``: each pair's
    dataset index; ``reference_logps``: ``(B, 2)`` precomputed reference log-probabilities
    (chosen, rejected), or None. ``num_samples`` counts pairs."""

    image_repeats: int = 2
    indices: Optional[torch.Tensor] = None
    reference_logps: Optional[torch.Tensor] = None

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PreferenceBatch":
        moved = super()._map_tensors(fn)
        return dataclasses.replace(moved, indices=None if self.indices is None else fn(self.indices),
                                   reference_logps=None if self.reference_logps is None else fn(self.reference_logps))

    def model_inputs(self, with_labels: bool = True) -> Dict[str, Any]:
        """As :meth:`Batch.model_inputs`, with ``image_repeats``."""
        return {**super().model_inputs(with_labels), "image_repeats": self.image_repeats}


def answer_labels(processor: VLMProcessor, prompt: Sequence[Turn], answer: str, where: str):
    """``(input_ids, labels)`` of ``prompt`` + the assistant ``answer``: labels only after the
    generation prompt (earlier assistant turns of the prompt are not trained)."""
    prompt_ids, _ = processor.tokenize(prompt, add_generation_prompt=True)
    ids, labels = processor.tokenize([*prompt, Turn("assistant", answer)])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataFormatError(f"{where}: the template's generation prompt is not a prefix of the answered "
                              "conversation; pairs need a template whose prompt and answer tokenise apart")
    labels = [IGNORE_INDEX] * len(prompt_ids) + labels[len(prompt_ids):]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataFormatError(f"{where}: the answer has no trained token")
    return ids, labels


class PairDataset(Dataset):
    """Preference Samples (``meta`` ``chosen`` and ``rejected``) tokenised by a processor; pairs
    longer than ``max_length`` are left out, counted in ``stats`` and logged. ``reference``:
    precomputed ``(len, 2)`` reference log-probabilities, set by the stage when it has them."""

    def __init__(self, samples: Sequence[Sample], processor: VLMProcessor, name: str = "data",
                 progress: bool = True):
        self.processor = processor
        self.name = name
        self.stats: Counter = Counter()
        self.entries: List[tuple] = []
        self.reference: Optional[torch.Tensor] = None
        too_long: List[str] = []
        for sample in tqdm(samples, desc=f"tokenizing pairs {name}", disable=not progress, leave=False):
            where = sample.meta.get("source", sample.id)
            if "chosen" not in sample.meta or "rejected" not in sample.meta:
                raise DataFormatError(f"{where}: not a preference pair (no 'chosen' / 'rejected'); a preference "
                                      "objective reads format: preference_json")
            prompt = processor.prompt_turns(sample.turns)
            chosen = answer_labels(processor, prompt, sample.meta["chosen"], where)
            rejected = answer_labels(processor, prompt, sample.meta["rejected"], where)
            if max(len(chosen[0]), len(rejected[0])) > processor.max_length:
                too_long.append(where)
                continue
            self.entries.append((sample, chosen, rejected))
        self.stats["kept"] = len(self.entries)
        if too_long:
            self.stats["too_long"] = len(too_long)
            logger.warning("%s: %d pair(s) left out (longer than max_length %d), e.g. %s", name, len(too_long),
                           processor.max_length, ", ".join(too_long[:3]))
        self.image_failures = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lengths(self) -> List[int]:
        """Each pair's longer row (for length-grouped sampling)."""
        return [max(len(c[0]), len(r[0])) for _, c, r in self.entries]

    def __getitem__(self, index: int) -> Optional[EncodedPair]:
        sample, (c_ids, c_labels), (r_ids, r_labels) = self.entries[index]
        images = unless_unreadable(lambda: [self.processor.load_image(p) for p in sample.images], sample,
                                   where=self.name)
        if images is None:
            self.image_failures += 1
            return None
        return EncodedPair(c_ids, c_labels, r_ids, r_labels, images,
                           image_instructions(sample.turns, self.processor.image_token), index,
                           None if self.reference is None else self.reference[index])


class PairCollator:
    """A DataLoader ``collate_fn``: :class:`EncodedPair` items in, one :class:`PreferenceBatch`
    out (None items, unreadable images, dropped and counted in ``skipped``)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Optional[EncodedPair]]) -> PreferenceBatch:
        kept = [item for item in items if item is not None]
        rows = [(p.chosen_ids, p.chosen_labels) for p in kept] + [(p.rejected_ids, p.rejected_labels) for p in kept]
        width = max((len(ids) for ids, _ in rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            labels[r, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
            mask[r, : len(row_ids)] = 1
        images = [image for p in kept for image in p.images]
        references = [p.reference for p in kept]
        reference = torch.stack(references) if kept and all(r is not None for r in references) else None
        return PreferenceBatch(
            input_ids=ids, labels=labels, attention_mask=mask, images=torch.stack(images) if images else None,
            instructions=[text for p in kept for text in p.instructions], num_samples=len(kept),
            skipped=len(items) - len(kept), indices=torch.tensor([p.index for p in kept], dtype=torch.long),
            reference_logps=reference)
