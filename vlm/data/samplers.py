"""Index samplers for the training loader, each order a function of the seed and the epoch.

Index samplers for the training loader; each order depends only on the seed and the epoch, so a
resumed run (which sets the epoch and skips the batches already done) replays it exactly.

- :class:`EpochShuffleSampler`: a fresh permutation per epoch.
- :class:`LengthGroupedSampler`: batches of similar length (less padding, fuller packed rows),
  samples with images and text-only samples in separate batches. The order follows LLaVA's
  ``group_by_modality_length`` sampler: shuffle each modality, cut it into megabatches of
  ``world_size x batch_size``, sort each megabatch by length (longest first), then shuffle the
  order of the megabatches, so that every ``world_size`` consecutive batches are of one
  modality and of similar length.
"""

from __future__ import annotations

from typing import Iterator, List, Sequence

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``seed`` and the epoch, so resume can replay it."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class LengthGroupedSampler(Sampler[int]):
    """Indices in megabatches of ``world_size * batch_size`` sorted by length, one modality per
    megabatch (``has_image[i]``), megabatch order shuffled; deterministic from seed and epoch.

    With several processes, the loader's distributed wrapper hands consecutive ``batch_size``
    slices of each megabatch to the ranks, so the ranks' batches at one step are alike too.
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int,
                 world_size: int = 1):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths but {len(has_image)} modality flags")
        self.lengths = list(lengths)
        self.has_image = list(has_image)
        self.megabatch = batch_size * world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of ``epoch``."""
        self.epoch = epoch

    def _megabatches(self, indices: List[int], generator: torch.Generator) -> List[List[int]]:
        shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
        chunks = [shuffled[i:i + self.megabatch] for i in range(0, len(shuffled), self.megabatch)]
        return [sorted(chunk, key=lambda i: -self.lengths[i]) for chunk in chunks]

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        with_image = [i for i, image in enumerate(self.has_image) if image]
        text_only = [i for i, image in enumerate(self.has_image) if not image]
        megabatches = self._megabatches(with_image, generator) + self._megabatches(text_only, generator)
        # the two modalities' last (partial) megabatches go last, as in LLaVA, so no full
        # megabatch ends up mixed across a batch boundary
        full = [m for m in megabatches if len(m) == self.megabatch]
        partial = [m for m in megabatches if len(m) < self.megabatch]
        order = torch.randperm(len(full), generator=generator).tolist()
        return iter([i for m in [full[j] for j in order] + partial for i in m])

    def __len__(self) -> int:
        return len(self.lengths)
