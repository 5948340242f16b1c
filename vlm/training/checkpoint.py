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
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from vlm.config import ModelConfig, StageConfig, Train
from vlm.errors import CheckpointError, describe_os_error
from vlm.training.nonfinite import check_finite_weights
from vlm.training.stages import COMPONENTS, train_mode

MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"
SHA256 = "sha256"  # a manifest entry's checksum of its weight file

logger = logging.getLogger(__name__)


TMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_tmp(parent: str | Path) -> List[Path]:
    """Delete the ``.NAME.tmp-PID`` / ``.NAME.old-PID`` folders that :func:`atomic_dir` left in
    ``parent`` when the process PID died mid-write (and only those: nothing vlm did not write)."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = TMP_PATTERN.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        logger.info("removed %d stale temporary folder(s) of dead runs in %s", len(removed), parent)
    return removed


def _fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder`` (and the folders themselves) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def io_error(exc: OSError, path: Path, doing: str) -> CheckpointError:
    """A CheckpointError for an I/O failure: says what (disk full, permission...) and names the path."""
    return CheckpointError(f"{doing} {path}: {describe_os_error(exc, exc.filename or path)}")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only if the block completes. Its files
    are fsynced before the rename; stale temporary folders of dead processes are removed first.
    An OSError (disk full, permission) becomes a CheckpointError naming the path."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise io_error(exc, final.parent, "cannot write") from exc
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CheckpointError):
            raise io_error(exc, final, "cannot write") from exc
        if isinstance(exc, (RuntimeError, SafetensorError)) and _looks_like_short_write(exc):
            free = shutil.disk_usage(final.parent).free / 2**20
            raise CheckpointError(f"cannot write {final}: the write failed ({str(exc).splitlines()[0]}); "
                                  f"is the disk full? {free:.0f} MiB free there") from exc
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _looks_like_short_write(exc: BaseException) -> bool:
    """torch.save / safetensors report a full disk as a failed or short write, not an OSError."""
    text = str(exc).lower()
    return any(k in text for k in ("unexpected pos", "failed to write", "write failed", "no space", "file write"))


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hashed_file(kind: str, path: str | Path) -> Path:
    """The file an entry's sha256 covers: the weights file, or an adapter's safetensors."""
    return Path(path) if kind == "weights" else Path(path) / "adapter_model.safetensors"


def _contained(path: Path, folder: Path) -> bool:
    """``path`` is inside ``folder``, or inside another vlm stage output (a folder with a
    manifest: an earlier stage of the chain)."""
    for parent in [path.parent, *path.parent.parents]:
        if parent == folder or (parent / MANIFEST).is_file():
            return True
    return False


def read_manifest(folder: str | Path) -> Dict[str, List[dict]]:
    """The manifest of a stage output, with paths made absolute."""
    folder = Path(folder).resolve()
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a vlm checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        resolved: Dict[str, List[dict]] = {}
        for comp, entries in manifest.items():
            resolved[comp] = []
            for entry in entries:
                out = {}
                for kind, rel in entry.items():
                    if kind == SHA256:
                        out[kind] = rel
                        continue
                    target = (folder / rel).resolve()
                    if kind not in ("weights", "adapter") or not _contained(target, folder):
                        raise CheckpointError(f"{path}: {comp} entry '{kind}: {rel}' points outside the checkpoint "
                                              "(only weights / adapters inside vlm stage outputs are read)")
                    out[kind] = str(target)
                resolved[comp].append(out)
    except (ValueError, AttributeError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a valid manifest ({exc})") from None
    return resolved


def _has_pretrained_source(model_cfg: ModelConfig, component: str) -> bool:
    if component == "vision":
        return bool(model_cfg.vision.pretrained)
    if component == "llm":
        return bool(model_cfg.llm.name_or_path)
    return False


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
            raise CheckpointError(f"{comp}: LoRA on randomly initialised weights cannot be saved; "
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
            if comp == "llm":  # so that plain PEFT can load it (vlm.interop.peft_adapter)
                from vlm.interop.peft_adapter import record_adapter_base

                record_adapter_base(module, folder / "llm_adapter", model_cfg, tokenizer, entries,
                                    state=None if state is None else _component_state(state, comp))
            entries.append({"adapter": str(folder / f"{comp}_adapter")})
        for entry in entries:  # a checksum for every weight file (the earlier stages' are carried)
            if SHA256 not in entry:
                kind = "weights" if "weights" in entry else "adapter"
                entry[SHA256] = sha256_file(_hashed_file(kind, entry[kind]))
        manifest[comp] = [
            {kind: (path if kind == SHA256 else os.path.relpath(path, folder)) for kind, path in entry.items()}
            for entry in entries
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
            verify_entry(entry, folder)
            if "weights" in entry:
                load_safetensors(module, entry["weights"])
            else:
                module = PeftModel.from_pretrained(module, entry["adapter"]).merge_and_unload()
        setattr(model, comp, module)
    check_finite_weights(model, str(folder))  # a diverged run's weights are refused, never used


def verify_entry(entry: dict, folder) -> None:
    """CheckpointError naming the file when its sha256 differs from the manifest's (flipped
    bytes, a truncated copy); entries written before checksums existed are not checked."""
    expected = entry.get(SHA256)
    if expected is None:
        return
    kind = "weights" if "weights" in entry else "adapter"
    path = _hashed_file(kind, entry[kind])
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise io_error(exc, path, f"checkpoint {folder}: cannot read") from exc
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the manifest of {folder} "
                              f"({expected[:12]}...); the file is corrupt or was changed: copy it again")


def load_safetensors(module, path: str | Path) -> None:
    """``safetensors.torch.load_model``, strict: errors name the file and the keys that differ."""
    try:
        missing, unexpected = load_model(module, str(path), strict=False)
    except OSError as exc:
        raise io_error(exc, Path(path), "cannot read") from exc
    except (SafetensorError, RuntimeError, ValueError) as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise CheckpointError(f"{path}: cannot load ({detail}); the file is truncated, "
                              "corrupt or of another model") from None
    if missing or unexpected:
        raise CheckpointError(f"{path}: its weights do not fit the model the config builds (missing: "
                              f"{sorted(missing)[:4] or 'none'}, unexpected: {sorted(unexpected)[:4] or 'none'}); "
                              "was it saved with other model options, or for another component?")


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
                raise CheckpointError(f"{folder}: adapter keys do not match the model: {result.unexpected_keys[:3]}")
        elif weights.is_file():
            load_safetensors(module, weights)


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
                raise CheckpointError(f"{folder}: adapter keys do not match the model: {unknown[:3]}")
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
