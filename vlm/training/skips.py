"""Samples dropped while loading batches (unreadable images), counted in the main process.

A dataset item whose image cannot be read is ``None``; the collate
(:class:`vlm.data.batch.Collator`) drops it. With ``num_workers > 0`` that happens in worker
processes, whose counters the trainer never sees, so the batch itself carries the number dropped
(``Batch.skipped``) and :class:`SkipCounter` (in the training loop) adds it up. A batch left
with no sample is skipped and counted, never fed to the model, and a stage whose failure ratio
passes ``max_image_failure_ratio`` stops with a :class:`~vlm.core.errors.TrainingError` (a
wrong ``image_root`` fails every image).
"""

from __future__ import annotations

import logging

import torch

from vlm.core.errors import TrainingError
from vlm.data.batch import Batch

logger = logging.getLogger(__name__)

# below this many loaded samples the failure ratio is not judged (one bad image in a tiny batch)
MIN_SAMPLES_FOR_RATIO = 8


class SkipCounter:
    """Counts samples and whole batches dropped for unreadable images during one stage."""

    def __init__(self, stage_name: str, max_failure_ratio: float, batches_per_epoch: int, accelerator=None):
        self.stage_name = stage_name
        self.accelerator = accelerator
        self.max_failure_ratio = max_failure_ratio
        self.batches_per_epoch = batches_per_epoch
        self.samples = 0
        self.skipped_samples = 0
        self.skipped_batches = 0
        self._empty_in_a_row = 0

    def observe(self, batch: Batch, step: int) -> bool:
        """Count ``batch``'s samples and those its collate dropped; False when it has no sample
        left (skip it). Raises TrainingError when too large a share of the samples failed."""
        skipped, kept = batch.skipped, batch.num_samples
        acc = self.accelerator
        empty = kept == 0
        if acc is not None and acc.num_processes > 1:  # decide alike on every rank, or they desynchronise
            counts = acc.reduce(torch.tensor([kept, skipped, int(empty)], device=acc.device), reduction="sum")
            kept, skipped, empty_ranks = (int(c) for c in counts.tolist())
            empty = empty_ranks > 0  # one rank without a sample: every rank skips this batch
        self.samples += kept + skipped
        self.skipped_samples += skipped
        if self.samples >= MIN_SAMPLES_FOR_RATIO and self.skipped_samples > self.max_failure_ratio * self.samples:
            raise TrainingError(
                f"stage '{self.stage_name}' step {step}: {self.skipped_samples} of {self.samples} samples had "
                f"unreadable images (more than max_image_failure_ratio = {self.max_failure_ratio}); check the "
                "datasets' image_root and the warnings above")
        if empty:
            self.skipped_batches += 1
            self._empty_in_a_row += 1
            logger.warning("stage %s: a batch with no readable image was skipped (%d so far)", self.stage_name,
                           self.skipped_batches)
            if self._empty_in_a_row >= self.batches_per_epoch:
                raise TrainingError(f"stage '{self.stage_name}' step {step}: a whole epoch of batches without a "
                                    "readable image; check the datasets' image_root and the warnings above")
            return False
        self._empty_in_a_row = 0
        return True

    def summary(self) -> str:
        """One line for the end of the stage."""
        return (f"stage {self.stage_name}: {self.skipped_samples} of {self.samples} samples skipped for "
                f"unreadable images ({self.skipped_batches} whole batches)")
