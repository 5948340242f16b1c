"""Evaluation over several processes: each rank answers a share, rank 0 gathers and scores.

Evaluation over several processes: each rank answers its share of the samples, rank 0 gathers
them in the original order, writes the result files and scores them; every rank returns the
same scores.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is started through accelerate's
``PartialState`` (gloo on CPU, NCCL with one GPU per rank); in one process nothing changes.
"""

from __future__ import annotations

import os
from typing import Any, List, Sequence, Tuple

import torch
import torch.distributed as dist


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size), starting the process group when the launcher announced several
    processes and nobody has started it yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in one process)."""
    return rank_and_world()[0] == 0


def shard_indices(count: int, rank: int, world: int) -> List[int]:
    """The sample indices rank ``rank`` of ``world`` evaluates: every world-th one, so that
    each rank gets the same number of samples to within one."""
    return list(range(rank, count, world))


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` from every rank, in rank order (just ``[obj]`` in one process)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: List[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(indices: Sequence[int], values: Sequence[Any], count: int) -> List[Any]:
    """Every rank's ``values`` (one per index of its shard) merged back into the original order of
    ``count`` samples; raises if a sample was answered twice or not at all."""
    merged: List[Any] = [None] * count
    seen = [0] * count
    for part_indices, part_values in gather_objects((list(indices), list(values))):
        for index, value in zip(part_indices, part_values):
            merged[index] = value
            seen[index] += 1
    if any(n != 1 for n in seen):
        raise RuntimeError(f"distributed evaluation: samples answered {sorted(set(seen))} times, expected once each")
    return merged


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    _, world = rank_and_world()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
