"""Video frames' visual tokens pooled as LLaVA-OneVision does: bilinear, on each frame's grid."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def grid_side(num_tokens: int) -> Optional[int]:
    """The side of the square token grid ``num_tokens`` lays out, or None when it is not square."""
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None


def pooled_tokens(num_tokens: int, stride: int) -> Optional[int]:
    """Tokens per frame after pooling a frame's ``num_tokens`` by ``stride``; None when they do
    not form a square grid (and ``stride`` > 1: nothing to pool on)."""
    if stride == 1:
        return num_tokens
    side = grid_side(num_tokens)
    return None if side is None else math.ceil(side / stride) ** 2


def pool_frames(tokens: torch.Tensor, stride: int) -> torch.Tensor:
    """``(m, K, H)`` frame tokens -> ``(m, K', H)``: the ``sqrt(K)`` square grid resized to
    ``ceil(sqrt(K) / stride)`` by bilinear interpolation (LLaVA-OneVision's ``get_2dPool``)."""
    if stride == 1:
        return tokens
    m, k, h = tokens.shape
    side = grid_side(k)
    if side is None:
        raise ValueError(f"cannot pool {k} visual tokens per frame: not a square grid (set model.video.pool: 1)")
    target = math.ceil(side / stride)
    grid = tokens.reshape(m, side, side, h).permute(0, 3, 1, 2)
    pooled = F.interpolate(grid.float(), size=(target, target), mode="bilinear").to(tokens.dtype)
    return pooled.permute(0, 2, 3, 1).reshape(m, target * target, h)


def flatten_with_frames(visual: torch.Tensor, frame_mask: Optional[torch.Tensor], stride: int) -> torch.Tensor:
    """Every image's tokens, frames pooled, laid end to end in image order: ``(total, H)``."""
    if frame_mask is None or not bool(frame_mask.any()):
        return visual.reshape(-1, visual.shape[-1])
    frames = pool_frames(visual[frame_mask], stride)
    pieces, next_frame = [], iter(frames)
    for i, is_frame in enumerate(frame_mask.tolist()):
        pieces.append(next(next_frame) if is_frame else visual[i])
    return torch.cat(pieces)
