"""A stage output loaded for use: the model rebuilt from its config and manifest, its tokenizer.

A stage output loaded for use: the model rebuilt from its config and manifest, its tokenizer;
what inference, evaluation, export and the next stage's ``init_from`` read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from vlm.checkpoint.components import CONNECTOR_TOKENIZER, load_model_state
from vlm.config import ModelConfig
from vlm.core.errors import CheckpointError
from vlm.core.plugins import load_saved_plugins
from vlm.modeling.build import build_model
from vlm.modeling.llm import load_tokenizer
from vlm.modeling.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)


def load_stage_tokenizer(model_cfg, init_from: Optional[str]):
    """The tokenizer saved with ``init_from`` when given, else the one the model config names."""
    if init_from:
        require_stage_output(init_from, "init_from")
        return AutoTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
    return load_tokenizer(model_cfg.llm, model_cfg.image_token)


def require_stage_output(folder: str | Path, what: str) -> Path:
    """``folder`` as a Path; a CheckpointError naming ``what`` unless it is a vlm stage output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what} {folder}: no such folder; give a stage output (e.g. runs/NAME/STAGE/final)")
    missing = [n for n in ("manifest.json", "model.yaml", "tokenizer") if not (folder / n).exists()]
    if missing:
        raise CheckpointError(f"{what} {folder}: not a vlm stage output ({', '.join(missing)} missing)")
    return folder


def load_pretrained(folder: str | Path, device: Optional[str] = None,
                    trust_remote_code: bool = False) -> Tuple[VisionLanguageModel, object, DictConfig]:
    """Rebuild a trained model from a stage output folder: ``(model, tokenizer, model_cfg)``,
    on ``device`` (default: CUDA when available, else CPU).

    ``trust_remote_code`` comes from the caller (a CLI flag, the user's own config), never from
    the folder: the ``model.yaml`` of a checkpoint someone sent cannot switch it on."""
    folder = require_stage_output(folder, "checkpoint")
    load_saved_plugins(folder)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(folder / "model.yaml"))
    if model_cfg.llm.trust_remote_code and not trust_remote_code:
        logger.warning("%s/model.yaml sets llm.trust_remote_code; ignored (pass --trust-remote-code to allow it)",
                       folder)
    model_cfg.llm.trust_remote_code = bool(trust_remote_code)
    if (folder / CONNECTOR_TOKENIZER).is_dir():  # carried: the folder it was read from need not exist now
        model_cfg.connector.options.text_tokenizer = str(folder / CONNECTOR_TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = build_model(model_cfg, tokenizer)
    load_model_state(model, folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, model_cfg
