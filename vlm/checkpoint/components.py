"""Per-component weights of a stage output: safetensors or PEFT adapters, chained by the manifest.

A stage output (``final/`` or ``checkpoints/step_N/``) holds:

- ``manifest.json``: for each component, the ordered list of weight files and adapters that
  rebuild it on top of its config (paths relative to this folder, so a run folder can move);
- ``<component>.safetensors`` for what trained fully in this stage (and, once, for a randomly
  initialised component that has no pretrained source, so the chain can be rebuilt);
- ``llm_adapter/``: LoRA adapters in PEFT's own format;
- ``model.yaml`` and ``tokenizer/`` (and ``connector_tokenizer/``, a connector's own text
  tokenizer such as the Q-Former's): everything needed to rebuild the model with
  :func:`load_pretrained`;
- ``training_state.pt`` (checkpoints only): optimizer, scheduler, every rank's RNG and the data
  position.

Under a sharding strategy (``fsdp``, ``zero3``) the trainer gathers the full state first and passes
it as ``state``; the files are the same as without sharding.

Every folder is written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from omegaconf import OmegaConf
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from vlm.checkpoint.fsio import io_error, sha256_file
from vlm.checkpoint.manifest import (
    MANIFEST,
    SHA256,
    has_pretrained_source,
    hashed_file,
    read_manifest,
    unsaveable_lora,
    verify_entry,
)
from vlm.checkpoint.peft_sidecar import record_adapter_base
from vlm.config import COMPONENTS, ModelConfig, Train
from vlm.core.errors import CheckpointError
from vlm.modeling.weights import check_finite_weights

# the connector's own tokenizer (e.g. the Q-Former's), when it has one
CONNECTOR_TOKENIZER = "connector_tokenizer"


def _component_state(state: Dict[str, torch.Tensor], comp: str) -> Dict[str, torch.Tensor]:
    prefix = comp + "."
    return {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}


def save_model_state(model, folder: Path, modes: Mapping[str, Train], model_cfg: ModelConfig,
                     tokenizer, prior: Optional[Dict[str, List[dict]]],
                     state: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Write what this stage trained (``modes``: each component's train mode), carrying earlier
    entries forward, into ``folder``.

    ``state``: the model's full state dict gathered from shards; the tensors are taken from it
    instead of from ``model`` (whose parameters are then shards)."""
    refusal = unsaveable_lora(modes, model_cfg, prior)
    if refusal:
        raise CheckpointError(refusal)
    manifest: Dict[str, List[dict]] = {}
    for comp in COMPONENTS:
        entries = [dict(e) for e in (prior or {}).get(comp, [])]
        module = getattr(model, comp)
        mode = Train(modes[comp])
        unsourced = not entries and not has_pretrained_source(model_cfg, comp)
        if mode is Train.full or unsourced:
            if state is None:
                save_model(module, str(folder / f"{comp}.safetensors"))
            else:
                save_file(_component_state(state, comp), str(folder / f"{comp}.safetensors"))
            entries = [{"weights": str(folder / f"{comp}.safetensors")}]
        elif mode is Train.lora:
            extra = {} if state is None else {"state_dict": _component_state(state, comp)}
            module.save_pretrained(str(folder / f"{comp}_adapter"), **extra)
            if comp == "llm":  # so that plain PEFT can load it (vlm.checkpoint.peft_sidecar)
                    record_adapter_base(module, folder / "llm_adapter", model_cfg, tokenizer, entries,
                                    state=None if state is None else _component_state(state, comp))
            entries.append({"adapter": str(folder / f"{comp}_adapter")})
        for entry in entries:  # a checksum for every weight file (the earlier stages' are carried)
            if SHA256 not in entry:
                kind = "weights" if "weights" in entry else "adapter"
                entry[SHA256] = sha256_file(hashed_file(kind, entry[kind]))
        manifest[comp] = [
            {kind: (path if kind == SHA256 else os.path.relpath(path, folder)) for kind, path in entry.items()}
            for entry in entries
        ]
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    # resolved: `model_cfg` is usually a node of the run config (`${prepare.tokenizer.out}`,
    # `${oc.env:...}`), and model.yaml is read back on its own by load_pretrained
    (folder / "model.yaml").write_text(OmegaConf.to_yaml(model_cfg, resolve=True))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    own = model.connector.own_tokenizer()
    if own is not None:  # so that the stage output needs no folder outside it
        own.save_pretrained(str(folder / CONNECTOR_TOKENIZER))


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


def load_trained_state(model, folder: str | Path, modes: Mapping[str, Train]) -> None:
    """Load a checkpoint of the *current* stage into a model already set up for that stage:
    full weights saved in that folder, and adapter weights into the live LoRA wrapper."""
    folder = Path(folder)
    for comp in COMPONENTS:
        module = getattr(model, comp)
        weights = folder / f"{comp}.safetensors"
        if Train(modes[comp]) is Train.lora:
            adapter = load_file(str(folder / f"{comp}_adapter" / "adapter_model.safetensors"))
            result = set_peft_model_state_dict(module, adapter)
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"{folder}: adapter keys do not match the model: {result.unexpected_keys[:3]}")
        elif weights.is_file():
            load_safetensors(module, weights)


def trained_state(model, folder: str | Path, modes: Mapping[str, Train]) -> Dict[str, torch.Tensor]:
    """What :func:`load_trained_state` loads, as one state dict keyed like ``model.state_dict()``
    (adapter keys carry the live adapter name), for loading into a sharded model."""
    folder = Path(folder)
    state: Dict[str, torch.Tensor] = {}
    for comp in COMPONENTS:
        module = getattr(model, comp)
        weights = folder / f"{comp}.safetensors"
        if Train(modes[comp]) is Train.lora:
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


