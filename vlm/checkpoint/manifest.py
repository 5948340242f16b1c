"""A stage output's manifest: each component's weight files and adapters, with checksums.

A stage output's manifest: for each component, the ordered weight files and adapters that
rebuild it, each with its sha256; paths relative to the folder, read back made absolute and
confined to vlm stage outputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from vlm.checkpoint.fsio import io_error, sha256_file
from vlm.config import COMPONENTS, Train
from vlm.core.errors import CheckpointError

MANIFEST = "manifest.json"
SHA256 = "sha256"  # a manifest entry's checksum of its weight file


def hashed_file(kind: str, path: str | Path) -> Path:
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


def verify_entry(entry: dict, folder) -> None:
    """CheckpointError naming the file when its sha256 differs from the manifest's (flipped
    bytes, a truncated copy); entries written before checksums existed are not checked."""
    expected = entry.get(SHA256)
    if expected is None:
        return
    kind = "weights" if "weights" in entry else "adapter"
    path = hashed_file(kind, entry[kind])
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise io_error(exc, path, f"checkpoint {folder}: cannot read") from exc
    if actual != expected:
        raise CheckpointError(f"{path}: sha256 {actual[:12]}... does not match the manifest of {folder} "
                              f"({expected[:12]}...); the file is corrupt or was changed: copy it again")


def has_pretrained_source(model_cfg, component: str) -> bool:
    """Whether ``model_cfg`` loads pretrained weights for ``component`` (vision or llm)."""
    if component == "vision":
        return bool(model_cfg.vision.pretrained)
    if component == "llm":
        return bool(model_cfg.llm.name_or_path)
    return False


def unsaveable_lora(modes: Mapping[str, Train], model_cfg,
                    prior: Optional[Dict[str, List[dict]]]) -> Optional[str]:
    """Why a stage's LoRA could not be saved (a component with no weights to put the adapter
    on: no earlier stage's entry in ``prior`` and no pretrained source), or None. Known before
    training, so stages ask it before step 1 (vlm.app.stages) rather than at the save."""
    for comp in COMPONENTS:
        lora = Train(modes[comp]) is Train.lora
        if lora and not (prior or {}).get(comp) and not has_pretrained_source(model_cfg, comp):
            return (f"{comp}: LoRA on randomly initialised weights cannot be saved; "
                    "train the component fully in an earlier stage or load pretrained weights")
    return None
