"""``vlm merge``: a stage output with its LoRA adapters folded into full weights.

``vlm merge``: a stage output with its LoRA adapters folded into full weights (by PEFT's
``merge_and_unload`` as the stage output is loaded), which ``vlm chat``, ``vlm eval``,
``init_from`` and ``vlm export`` read like any other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.manifest import read_manifest
from vlm.checkpoint.output_dirs import check_output_dir, replacing_output_dir
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import Train
from vlm.core.plugins import PLUGINS_FILE


def merge_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the stage output ``checkpoint`` with its LoRA adapters folded into full weights as a
    stage output ``out`` (atomically; a non-empty ``out`` only with ``overwrite``): every
    component with weights of its own is written whole; one read only from its pretrained
    source stays that way. Returns ``out``."""
    check_output_dir(out, overwrite)
    model, tokenizer, model_cfg = load_pretrained(checkpoint, device="cpu")  # adapters merged here
    manifest = read_manifest(checkpoint)
    modes = {comp: Train.full if entries else Train.frozen for comp, entries in manifest.items()}
    with replacing_output_dir(out, overwrite) as tmp:
        save_model_state(model, tmp, modes, model_cfg, tokenizer, prior=None)
        source = {"merged_from": str(Path(checkpoint).resolve()),
                  "adapters": [e["adapter"] for entries in manifest.values() for e in entries if "adapter" in e]}
        (tmp / "merge.json").write_text(json.dumps(source, indent=2))
        plugins = Path(checkpoint) / PLUGINS_FILE  # the components' plugin modules travel along
        if plugins.is_file():
            shutil.copy2(plugins, tmp / PLUGINS_FILE)
    return Path(out)
