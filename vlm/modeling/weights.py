"""Non-finite weights: found by name, refused before a save and after a load."""

from __future__ import annotations

from typing import Optional

import torch

from vlm.core.errors import CheckpointError


def first_nonfinite(module) -> Optional[str]:
    """The name of the first floating-point parameter or buffer of ``module`` (a module, or a
    state dict) holding a NaN or an infinity, or None when all are finite."""
    state = module if isinstance(module, dict) else module.state_dict()
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_weights(module, where: str, error=CheckpointError) -> None:
    """Raise ``error`` naming ``where`` and the tensor when ``module`` (a module or a state dict)
    has non-finite weights."""
    name = first_nonfinite(module)
    if name is not None:
        raise error(f"{where}: tensor '{name}' holds NaN or infinite values; these weights are unusable "
                    "(the run that wrote them diverged: lower the learning rate and retrain)")
