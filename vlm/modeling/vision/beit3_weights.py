"""unilm BEiT3 checkpoints -> torchscale ``BEiT3`` weights, with position-embedding interpolation.

unilm's checkpoints (``beit3_base_patch16_224.pth`` and the like) hold the torchscale model under
a ``beit3.`` key prefix, usually inside a ``model`` entry, next to task heads we do not use. The
vision position table ``encoder.embed_positions.A.weight`` has 2 unused rows (fairseq starts
positions at 2) and the CLS row in front of the patch grid; only the grid is resized.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from vlm.core.errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "beit3."
VISION_POSITIONS = "encoder.embed_positions.A.weight"
# rows before the patch grid in VISION_POSITIONS: fairseq's two padding positions, then CLS
EXTRA_POSITIONS = 3


def read_checkpoint(path: str | Path) -> Dict[str, torch.Tensor]:
    """The state dict in ``path`` (.safetensors, else ``torch.load(weights_only=True)``), taken
    from its ``model`` or ``module`` entry when it has one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BEiT3 checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # unilm's training checkpoints may carry their argparse arguments next to the weights
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "module"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def strip_prefix(state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """The ``beit3.*`` entries without the prefix; ValueError naming ``source`` when there are none."""
    weights = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if not weights:
        raise CheckpointError(f"{source}: no '{PREFIX}*' weights; not a unilm BEiT3 checkpoint "
                         f"(first keys: {list(state_dict)[:3]})")
    ignored = len(state_dict) - len(weights)
    if ignored:
        logger.info("%s: %d entries outside '%s' ignored (task heads)", source, ignored, PREFIX)
    return weights


def resize_vision_positions(weight: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """The vision position table ``(EXTRA_POSITIONS + h*w, D)`` for a new patch ``grid``: the
    extra rows unchanged, the square grid resized bicubically (as unilm does)."""
    old = math.isqrt(weight.shape[0] - EXTRA_POSITIONS)
    if old * old != weight.shape[0] - EXTRA_POSITIONS:
        raise CheckpointError(f"vision position table of {weight.shape[0]} rows is not "
                         f"{EXTRA_POSITIONS} + a square grid")
    if (old, old) == tuple(grid):
        return weight
    resized = resample_abs_pos_embed(weight[None].float(), new_size=list(grid), old_size=[old, old],
                                     num_prefix_tokens=EXTRA_POSITIONS, interpolation="bicubic",
                                     antialias=False)
    return resized[0].to(weight.dtype)


def load_unilm_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a unilm BEiT3 checkpoint into a torchscale ``BEiT3`` built for any image size.

    Every ``beit3.*`` tensor must match the model (missing or extra keys raise, naming the
    file); the vision position grid is interpolated to the model's patch grid.
    """
    weights = strip_prefix(read_checkpoint(path), str(path))
    if VISION_POSITIONS in weights:
        before = weights[VISION_POSITIONS].shape[0]
        weights[VISION_POSITIONS] = resize_vision_positions(weights[VISION_POSITIONS],
                                                            model.vision_embed.patch_shape)
        if weights[VISION_POSITIONS].shape[0] != before:
            logger.info("%s: vision positions interpolated from %d to %d rows", path, before,
                        weights[VISION_POSITIONS].shape[0])
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path}: does not fit this BEiT3 architecture: {exc}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not fit this BEiT3 architecture; missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
