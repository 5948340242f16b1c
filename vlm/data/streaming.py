"""A streaming dataset over shards: split across ranks and workers, shuffled, resumable exactly.

No per-record index is held: only each shard's sample count. Each epoch the shards are put in an
order drawn from the seed and the epoch, and the concatenated stream of their records is cut into
``world_size x workers`` equal, contiguous slots (the last ones wrap round to the start when the
count does not divide, as a distributed sampler pads), so every rank and every DataLoader worker
yields the same number of batches. Rank ``r``'s worker ``w`` reads slot ``r x workers + w``
through a shuffle buffer seeded by (seed, epoch, slot) and yields batches of ``batch_size``
items: :class:`~vlm.data.batch.EncodedSample` s, or None for a record that cannot be trained on
(skipped with its reason, an unreadable image, too long, no label), which the collate counts.

The DataLoader takes its workers' batches in turn, so after ``B`` batches of an epoch logical
worker ``l`` has yielded ``ceil((B - l) / workers)``; a resumed loader gives physical worker
``w`` the role of logical worker ``(w + B) mod workers`` and each skips what it had yielded
(reading and tokenizing, never decoding an image), so the resumed run sees exactly the batches the
uninterrupted run would have. :meth:`StreamingConversations.worker_positions` is what the
checkpoint records.

With ``group_by_length`` each worker sorts runs of ``LENGTH_GROUP_BATCHES`` batches by token
count (text tokens plus the image placeholders, known without decoding any image), then
shuffles the order of the batches of each run.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlm.data.batch import EncodedSample
from vlm.data.dataset import tokenize_for_training
from vlm.data.formats import source_shards
from vlm.data.images import unless_unreadable
from vlm.data.processor import VLMProcessor, image_instructions
from vlm.data.shards import Shard, Skipped
from vlm.data.types import Sample

logger = logging.getLogger(__name__)

LENGTH_GROUP_BATCHES = 16
LIST_SHARD_SIZE = 1000  # samples per shard of a source read into memory (a map-style reader's list)


def _read_list(shard: Shard, start: int) -> Iterator[Sample]:
    yield from shard.options["samples"][start:]


def list_shards(samples: Sequence[Sample], name: str, size: int = LIST_SHARD_SIZE) -> List[Shard]:
    """In-memory samples (a map-style reader's) as shards, so they mix with streamed sources."""
    return [Shard(f"{name}[{i}:{i + size}]", len(samples[i:i + size]), _read_list,
                  {"samples": list(samples[i:i + size])}) for i in range(0, len(samples), size)]


def limited(shards: Sequence[Shard], max_samples: Optional[int], repeat: int) -> List[Shard]:
    """The first ``max_samples`` records of ``shards`` (the last shard cut short), ``repeat`` times."""
    if max_samples:
        kept, left = [], max_samples
        for shard in shards:
            if left <= 0:
                break
            kept.append(shard if shard.count <= left else replace(shard, count=left))
            left -= kept[-1].count
        shards = kept
    return list(shards) * repeat


def stage_shards(data_cfgs, read: Callable[[Any], List[Sample]], image_token: Optional[str] = None
                 ) -> Optional[List[Shard]]:
    """The shards of a stage's datasets when at least one of them streams (the others' samples,
    read with ``read(entry)``, which applies the entry's ``max_samples`` and ``repeat``, become
    in-memory shards), else None (a map-style stage);
    ``image_token`` marks images in their texts."""
    streamed = [source_shards(d.format, dict(d.args), image_token) for d in data_cfgs]
    if all(s is None for s in streamed):
        return None
    shards: List[Shard] = []
    for index, (data, own) in enumerate(zip(data_cfgs, streamed)):
        if own is None:
            shards.extend(list_shards(read(data), f"data[{index}]:{data.format}"))  # max_samples, repeat applied
        else:
            shards.extend(limited(own, data.max_samples, data.repeat))
    return shards


class StreamingConversations(IterableDataset):
    """Batches of encoded samples streamed from ``shards`` for rank ``rank`` of ``world_size``
    with ``num_workers`` DataLoader workers (0: in the main process). ``image_load(image)``
    loads one image (default: the processor's). ``len()`` is the number of batches per rank and
    epoch."""

    def __init__(self, shards: Sequence[Shard], processor: VLMProcessor, *, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                 group_by_length: bool = False, name: str = "data",
                 image_load: Optional[Callable[[Any], torch.Tensor]] = None):
        self.shards = list(shards)
        self.processor = processor
        self.image_load = image_load or processor.load_image
        self.batch_size, self.seed, self.name = batch_size, seed, name
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.group_by_length = group_by_length
        self.total = sum(s.count for s in self.shards)
        self.per_slot = math.ceil(self.total / (world_size * self.workers)) if self.total else 0
        self.batches_per_worker = math.ceil(self.per_slot / batch_size)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_worker * self.workers

    def set_epoch(self, epoch: int) -> None:
        """Choose the shard order and the shuffles of ``epoch``."""
        self.epoch = epoch

    def start_at(self, batch: int) -> None:
        """The next iteration starts after this rank's first ``batch`` batches of the epoch."""
        self.start_batch = batch

    def worker_positions(self, epoch: int, batch: int) -> List[Dict[str, int]]:
        """After this rank's ``batch`` batches of ``epoch``: each logical worker's slot and how many
        batches it has yielded (what the checkpoint records)."""
        return [{"slot": self.rank * self.workers + w, "epoch": epoch,
                 "batches": max(0, math.ceil((batch - w) / self.workers))} for w in range(self.workers)]

    # ----------------------------------------------------------------------------------------

    def _slot_records(self, slot: int) -> Iterator[Any]:
        """The records of ``slot`` in this epoch's shard order, before the shuffle buffer."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        shards = [self.shards[i] for i in order.tolist()]
        position, end = slot * self.per_slot, (slot + 1) * self.per_slot
        while position < end:
            offset = position % self.total
            for shard in shards:  # the shard holding stream position `offset`
                if offset < shard.count:
                    break
                offset -= shard.count
            take = min(shard.count - offset, end - position)
            records = shard.records(offset)
            for _ in range(take):
                record = next(records, None)
                yield record if record is not None else Skipped(shard.path, f"ended before its {shard.count} records")
            position += take

    def _shuffled(self, slot: int) -> Iterator[Any]:
        rng = random.Random(f"{self.seed}:{self.epoch}:{slot}")
        buffer: List[Any] = []
        for record in self._slot_records(slot):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], record = record, buffer[i]
            yield record
        rng.shuffle(buffer)
        yield from buffer

    def _tokenized(self, record: Any):
        """(record, ids, labels) or (None, reason) for one record."""
        if isinstance(record, Skipped):
            logger.warning("%s: skipping %s: %s", self.name, record.where, record.reason)
            return None
        ids, labels, reason, _ = tokenize_for_training(self.processor, record)
        if reason:
            logger.warning("%s: skipping %s: %s", self.name, record.meta.get("source", record.id), reason)
            return None
        return record, ids, labels

    def _encoded(self, entry) -> Optional[EncodedSample]:
        if entry is None:
            return None
        sample, ids, labels = entry
        images = unless_unreadable(lambda: [self.image_load(image) for image in sample.images], sample,
                                   where=self.name)
        if images is None:
            return None
        return EncodedSample(ids, labels, images, image_instructions(sample.turns, self.processor.image_token))

    def _batches(self, slot: int) -> Iterator[List[Any]]:
        """The slot's batches of tokenized entries (None for a record left out), in order."""
        records = self._shuffled(slot)
        run = self.batch_size * (LENGTH_GROUP_BATCHES if self.group_by_length else 1)
        rng = random.Random(f"group:{self.seed}:{self.epoch}:{slot}")
        for _ in range(0, self.batches_per_worker * self.batch_size, run):
            entries = [self._tokenized(r) for _, r in zip(range(run), records)]
            if self.group_by_length:
                entries.sort(key=lambda e: -1 if e is None else -len(e[1]))
            batches = [entries[i:i + self.batch_size] for i in range(0, len(entries), self.batch_size)]
            if self.group_by_length:
                rng.shuffle(batches)
            yield from batches

    def __iter__(self) -> Iterator[List[Optional[EncodedSample]]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.start_batch) % self.workers
        done = max(0, math.ceil((self.start_batch - logical) / self.workers))
        for index, batch in enumerate(self._batches(self.rank * self.workers + logical)):
            if index >= done:  # the batches yielded before a resume are read, not decoded
                yield [self._encoded(entry) for entry in batch]
