"""Checkpoints: per-component safetensors, PEFT adapters, a manifest, and the training state.

A stage output (``final/`` or ``checkpoints/step_N/``) holds:

- ``manifest.json``: for each component, the ordered list of weight files and adapters that
  rebuild it on top of its config (paths relative to this folder, so a run folder can move);
- ``<component>.safetensors`` for what trained fully in this stage (and, once, for a randomly
  initialised component that has no pretrained source, so the chain can be rebuilt);
- ``llm_adapter/``: LoRA adapters in PEFT's own format;
- ``model.yaml`` and ``tokenizer/``: everything needed to rebuild the model with
  :func:`load_pretrained`;
- ``training_state.pt`` (checkpoints only): optimizer, scheduler, every rank's RNG and the data
  position.

Under a sharding strategy (``fsdp``, ``zero3``) the trainer gathers the full state first and passes
it as ``state``; the files are the same as without sharding.

Every folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, load_model, save_file, save_model

from vlm.config import ModelConfig, StageConfig, Train
from vlm.training.stages import COMPONENTS, train_mode

MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(folder: str | Path) -> Dict[str, List[dict]]:
    """The manifest of a stage output, with paths made absolute."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a vlm checkpoint: {MANIFEST} is missing")
    manifest = json.loads(path.read_text())
    return {
        comp: [{kind: str((folder / rel).resolve()) for kind, rel in entry.items()} for entry in entries]
        for comp, entries in manifest.items()
    }


def _has_pretrained_source(model_cfg: ModelConfig, component: str) -> bool:
    if component == "vision":
        return bool(model_cfg.vision.pretrained)
    if component == "llm":
        return bool(model_cfg.llm.name_or_path)
    return False


def _unwrap(module):
    return module.module if hasattr(module, "module") and not isinstance(module, PeftModel) else module


def _component_state(state: Dict[str, torch.Tensor], comp: str) -> Dict[str, torch.Tensor]:
    prefix = comp + "."
    return {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}


def save_model_state(model, folder: Path, stage: StageConfig, model_cfg: ModelConfig,
                     tokenizer, prior: Optional[Dict[str, List[dict]]],
                     state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write what this stage trained, carrying earlier entries forward, into ``folder``.

    ``state``: the model's full state dict gathered from shards; the tensors are taken from it
    instead of from ``model`` (whose parameters are then shards)."""
    manifest: Dict[str, List[dict]] = {}
    for comp in COMPONENTS:
        entries = [dict(e) for e in (prior or {}).get(comp, [])]
        module = getattr(model, comp)
        mode = train_mode(stage, comp)
        unsourced = not entries and not _has_pretrained_source(model_cfg, comp)
        if unsourced and mode is Train.lora:
            raise ValueError(f"{comp}: LoRA on randomly initialised weights cannot be saved; "
                             "train the component fully in an earlier stage or load pretrained weights")
        if mode is Train.full or unsourced:
            if state is None:
                save_model(module, str(folder / f"{comp}.safetensors"))
            else:
                save_file(_component_state(state, comp), str(folder / f"{comp}.safetensors"))
            entries = [{"weights": str(folder / f"{comp}.safetensors")}]
        elif mode is Train.lora:
            extra = {} if state is None else {"state_dict": _component_state(state, comp)}
            module.save_pretrained(str(folder / f"{comp}_adapter"), **extra)
            entries.append({"adapter": str(folder / f"{comp}_adapter")})
        manifest[comp] = [
            {kind: os.path.relpath(path, folder) for kind, path in entry.items()} for entry in entries
        ]
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    # resolved: `model_cfg` is usually a node of the run config (`${prepare.tokenizer.out}`,
    # `${oc.env:...}`), and model.yaml is read back on its own by load_pretrained
    (folder / "model.yaml").write_text(OmegaConf.to_yaml(model_cfg, resolve=True))
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def load_model_state(model, folder: str | Path) -> None:
    """Rebuild every component from a stage output's manifest; adapters are merged in."""
    for comp, entries in read_manifest(folder).items():
        module = getattr(model, comp)
        for entry in entries:
            if "weights" in entry:
                load_model(module, entry["weights"], strict=True)
            else:
                module = PeftModel.from_pretrained(module, entry["adapter"]).merge_and_unload()
        setattr(model, comp, module)


def load_trained_state(model, folder: str | Path, stage: StageConfig) -> None:
    """Load a checkpoint of the *current* stage into a model already set up for that stage:
    full weights saved in that folder, and adapter weights into the live LoRA wrapper."""
    folder = Path(folder)
    for comp in COMPONENTS:
        module = getattr(model, comp)
        weights = folder / f"{comp}.safetensors"
        if train_mode(stage, comp) is Train.lora:
            adapter = load_file(str(folder / f"{comp}_adapter" / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(module, adapter)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"{folder}: adapter keys do not match the model: {result.unexpected_keys[:3]}")
        elif weights.is_file():
            load_model(module, str(weights), strict=True)


def trained_state(model, folder: str | Path, stage: StageConfig) -> Dict[str, torch.Tensor]:
    """What :func:`load_trained_state` loads, as one state dict keyed like ``model.state_dict()``
    (adapter keys carry the live adapter name), for loading into a sharded model."""
    folder = Path(folder)
    state: Dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        module = getattr(model, comp)
        weights = folder / f"{comp}.safetensors"
        if train_mode(stage, comp) is Train.lora:
            adapter = load_file(str(folder / f"{comp}_adapter" / "adapter_model.safetensors"))
            name = module.active_adapter
            # PEFT saves lora keys without the adapter name (".default"): map the live names back
            live = {k.replace(f".{name}", ""): k for k in module.state_dict() if f".{name}." in k}
            unknown = [k for k in adapter if k not in live]
            if unknown:
                raise ValueError(f"{folder}: adapter keys do not match the model: {unknown[:3]}")
            state.update({f"{comp}.{live[k]}": v for k, v in adapter.items()})
        elif weights.is_file():
            state.update({f"{comp}.{k}": v for k, v in load_file(str(weights)).items()})
    return state


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
    return torch.load(Path(folder) / TRAINING_STATE, weights_only=True, map_location="cpu")


def latest_checkpoint(checkpoints: str | Path) -> Optional[Path]:
    """The newest complete ``step_*`` folder (temporary folders are ignored), or None."""
    folder = Path(checkpoints)
    steps = sorted(p for p in folder.glob("step_*") if (p / TRAINING_STATE).is_file()) if folder.is_dir() else []
    return steps[-1] if steps else None
