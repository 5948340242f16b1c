"""The training state of a periodic checkpoint: optimizer, scheduler, RNG, data position.

The training state is a dict of :class:`Stateful` objects by name (the trainer's: ``optimizer``,
``scheduler``, ``rng_per_rank``, ``position``, ``objective``), written to ``training_state.pt``
by one save path (:func:`collect_training_state` on every process, :func:`save_training_state`
on the main one) and read back by one restore path (:func:`restore_training_state`), with
``weights_only=True``. A new piece of state (a data loader's position, a tracker's run id) is one
more stateful in the dict.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol

import numpy as np
import torch

from vlm.checkpoint.fsio import io_error
from vlm.checkpoint.manifest import MANIFEST
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


class Stateful(Protocol):
    """What the training state is made of: anything with ``state_dict()`` and ``load_state_dict()``
    (an optimizer, a scheduler, the RNG, the data position, an objective's head...)."""

    def state_dict(self) -> Any:
        ...

    def load_state_dict(self, state: Any) -> None:
        ...


class StateFunctions:
    """A stateful made of two functions: ``get()`` gives the state, ``put(state)`` restores it
    (for state that lives in objects that are not statefuls themselves)."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        self.get, self.put = get, put

    def state_dict(self) -> Any:
        return self.get()

    def load_state_dict(self, state: Any) -> None:
        self.put(state)


class RNGStates:
    """Every process's RNG as one stateful: ``state_dict()`` gathers them in rank order (a
    collective: call it on every process); ``load_state_dict`` restores this process's (rank 0's
    when the checkpoint holds fewer)."""

    def __init__(self, rank: int = 0):
        self.rank = rank

    def state_dict(self) -> List[dict]:
        return gather_rng_states()

    def load_state_dict(self, state: List[dict]) -> None:
        set_rng_state(state[self.rank] if self.rank < len(state) else state[0])


def gather_objects(value: Any) -> List[Any]:
    """Every process's ``value`` (plain Python data), in rank order (collective when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class PerRank:
    """A stateful gathered from every process: ``state_dict()`` is the list of each rank's
    ``get()`` in rank order (a collective: call it on every process); ``load_state_dict`` hands
    ``put`` the whole list (each rank takes its own entry)."""

    def __init__(self, get: Callable[[], Any], put: Callable[[List[Any]], None]):
        self.get, self.put = get, put

    def state_dict(self) -> List[Any]:
        return gather_objects(self.get())

    def load_state_dict(self, state: List[Any]) -> None:
        self.put(state)


class DataPosition:
    """Where the data stands (``step``, ``epoch``, ``batch``, ``samples``): a dict the training
    loop advances in place, saved and restored as a stateful."""

    def __init__(self, **position: int):
        self.position: Dict[str, int] = {"step": 0, "epoch": 0, "batch": 0, "samples": 0, **position}

    def state_dict(self) -> Dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.position.clear()
        self.position.update(state)


# the file's keys, in the order they are written; "rng" (rank 0's state) is kept beside
# "rng_per_rank" so that the file reads as it always has
STATE_KEYS = ("optimizer", "scheduler", "rng_per_rank", "position", "objective")


def collect_training_state(states: Mapping[str, Stateful]) -> Dict[str, Any]:
    """Every stateful's ``state_dict()``, by name. Some are collectives (the RNG of every rank, a
    sharded optimizer): call it on every process; the main process writes the result."""
    return {name: stateful.state_dict() for name, stateful in states.items()}


def save_training_state(folder: Path, collected: Mapping[str, Any]) -> None:
    """Write :func:`collect_training_state`'s result as ``training_state.pt`` in ``folder``."""
    payload = dict(collected)
    if "rng_per_rank" in payload:
        payload["rng"] = payload["rng_per_rank"][0]
    torch.save(payload, Path(folder) / TRAINING_STATE)


def restore_training_state(folder: str | Path, states: Mapping[str, Stateful]) -> Dict[str, Any]:
    """Load ``folder``'s training state into each stateful by name (a checkpoint written before
    ``rng_per_rank`` existed restores every rank from ``rng``); returns what was read."""
    saved = load_training_state(folder)
    if "rng_per_rank" not in saved and "rng" in saved:
        saved["rng_per_rank"] = [saved["rng"]]
    missing = [name for name in states if name not in saved]
    if missing:
        raise CheckpointError(f"{Path(folder) / TRAINING_STATE}: no {', '.join(missing)} in the training state; "
                              "resume from another checkpoint")
    for name, stateful in states.items():
        stateful.load_state_dict(saved[name])
    return saved


def latest_checkpoint(checkpoints: str | Path) -> Optional[Path]:
    """The newest complete ``step_*`` folder (temporary folders are ignored), or None."""
    folder = Path(checkpoints)
    steps = sorted(p for p in folder.glob("step_*") if (p / TRAINING_STATE).is_file()) if folder.is_dir() else []
    return steps[-1] if steps else None


STEP_FOLDER = re.compile(r"^step_(\d+)$")


def prune_checkpoints(checkpoints: str | Path, keep_last: int, keep: Optional[Path] = None) -> List[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints in ``checkpoints`` (and never
    ``keep``); returns the deleted folders. Only folders named ``step_<int>`` holding a vlm
    manifest count: ``final/``, ``best/`` and anything vlm did not write are left alone. Each is
    renamed to ``.NAME.old-PID`` first, so a kill mid-delete leaves nothing a resume would read
    (the next checkpoint write removes such leftovers)."""
    folder = Path(checkpoints)
    if not folder.is_dir():
        return []
    steps = sorted((int(m[1]), p) for p in folder.iterdir()
                   if (m := STEP_FOLDER.match(p.name)) and p.is_dir() and (p / MANIFEST).is_file())
    doomed = [p for _, p in steps[:max(0, len(steps) - keep_last)] if keep is None or p != Path(keep)]
    for path in doomed:
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            raise io_error(exc, path, "cannot delete the old checkpoint") from exc
        shutil.rmtree(aside, ignore_errors=True)
    return doomed
