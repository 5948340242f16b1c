"""The training state of a periodic checkpoint: optimizer, scheduler, RNG, data position.

The training state of a periodic checkpoint (``training_state.pt``): optimizer, scheduler,
every rank's RNG, the data position and the objective's own parameters; loaded with
``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from vlm.checkpoint.fsio import io_error
from vlm.core.errors import CheckpointError

TRAINING_STATE = "training_state.pt"


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> List[dict]:
    """Every process's :func:`rng_state`, in rank order (collective when distributed)."""
    import torch.distributed as dist

    own = rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [own]
    import io

    buffer = io.BytesIO()  # tensors travel as torch.save bytes (all_gather_object mangles them)
    torch.save(own, buffer)
    blobs: List[Optional[bytes]] = [None] * dist.get_world_size()
    dist.all_gather_object(blobs, buffer.getvalue())
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in blobs]


def rank_rng_state(state: dict, rank: int) -> dict:
    """The RNG state saved for ``rank`` (rank 0's when the checkpoint has only one)."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]


def save_training_state(folder: Path, optimizer, scheduler, position: dict,
                        objective_state: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                        rng: Optional[List[dict]] = None) -> None:
    """Optimizer, scheduler, RNG (``rng_per_rank``: every process's), data position (``step``,
    ``epoch``, ``batch``...) and the objective's own parameters (e.g. a warm-up head), if any.
    ``optimizer_state``: the state gathered from shards, instead of ``optimizer.state_dict()``."""
    rng = rng or [rng_state()]
    torch.save(
        {"optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
         "scheduler": scheduler.state_dict(), "rng": rng[0], "rng_per_rank": rng,
         "position": dict(position), "objective": dict(objective_state or {})},
        folder / TRAINING_STATE,
    )


def load_training_state(folder: str | Path) -> dict:
    """The saved training state, loaded with ``weights_only=True``."""
    path = Path(folder) / TRAINING_STATE
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except OSError as exc:
        raise io_error(exc, path, "cannot read") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the training state ({str(exc).splitlines()[0]}); "
                              "resume from an earlier checkpoint (delete this one)") from None


def latest_checkpoint(checkpoints: str | Path) -> Optional[Path]:
    """The newest complete ``step_*`` folder (temporary folders are ignored), or None."""
    folder = Path(checkpoints)
    steps = sorted(p for p in folder.glob("step_*") if (p / TRAINING_STATE).is_file()) if folder.is_dir() else []
    return steps[-1] if steps else None
