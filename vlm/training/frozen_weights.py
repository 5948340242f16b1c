"""Frozen weights kept in the autocast dtype while a stage trains, instead of cast every step.

Under bf16 / fp16 autocast every ``F.linear`` and convolution casts its fp32 weight (and bias) to
the low dtype on every call, forward and, for the frozen LLM under LoRA, once per layer per
step: a full read and write of the frozen model per step. Frozen weights never change, so
:class:`FrozenWeightCast` casts each frozen linear / convolution weight once and swaps the
parameters' storage to that copy for the training steps; autocast then finds them already in
its dtype. The results are bitwise the ones autocast gives (it performs the same cast).

Parameters shared with a module autocast does not cast (an LM head tied to the input
embeddings) keep their fp32 storage. The fp32 tensors are kept and swapped back for anything
outside the training steps (checkpoints, callbacks) and when training ends, so saved weights
and evaluation are unchanged. Used by the trainer for the single-process / DDP strategy;
sharding strategies (FSDP, ZeRO) own their parameters' storage and are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import nn

_CAST_BY_AUTOCAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class FrozenWeightCast:
    """The frozen fp32 linear / convolution parameters of ``model`` with a ``dtype`` copy each."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        shared = {id(p) for m in model.modules() if not isinstance(m, _CAST_BY_AUTOCAST)
                  for p in m.parameters(recurse=False)}
        self.entries: List[Tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        seen = set()
        for module in model.modules():
            if not isinstance(module, _CAST_BY_AUTOCAST):
                continue
            for param in module.parameters(recurse=False):
                if (param.requires_grad or param.dtype != torch.float32 or id(param) in shared
                        or id(param) in seen):
                    continue
                seen.add(id(param))
                self.entries.append((param, param.data.to(dtype), param.data))
        self.low = False

    def __len__(self) -> int:
        return len(self.entries)

    def to_low(self) -> None:
        """Point the frozen parameters at their low-precision copies."""
        for param, low, _ in self.entries:
            param.data = low
        self.low = True

    def to_full(self) -> None:
        """Point the frozen parameters back at their fp32 tensors."""
        for param, _, full in self.entries:
            param.data = full
        self.low = False

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """fp32 frozen weights inside the block (a checkpoint, a callback), low ones after."""
        was_low = self.low
        self.to_full()
        try:
            yield
        finally:
            if was_low:
                self.to_low()
