"""``vlm data convert`` and ``vlm data inspect``: a stage's data written as shards, or reported on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig

from vlm.checkpoint.pretrained import load_stage_tokenizer
from vlm.core.errors import ConfigError
from vlm.data.convert import convert_stage, reader_entry
from vlm.data.inspection import inspect_stage
from vlm.data.processor import VLMProcessor
from vlm.data.templates import build_template


def _stage(cfg: DictConfig, name: str, config: str) -> DictConfig:
    if name not in cfg.stages:
        raise ConfigError(f"--stage: no stage '{name}' in {config}; stages: {list(cfg.stages)}")
    return cfg.stages[name]


def convert(cfg: DictConfig, stage: str, config: str, to: str, out: str, shard_size: int) -> Dict[str, Any]:
    """Write stage ``stage``'s data under ``out`` as ``to`` shards; the manifest's summary and
    the dataset entry that reads the shards back."""
    manifest = convert_stage(_stage(cfg, stage, config).data, cfg.model.image_token, out, to, shard_size)
    return {"out": str(out), "samples": manifest["samples"], "shards": len(manifest["shards"]),
            "bytes": manifest["bytes"], "sources": manifest["sources"], "skipped": len(manifest["skipped"]),
            "manifest": str(Path(out) / "manifest.json"), "data_entry": reader_entry(manifest, out)}


def inspect(cfg: DictConfig, stage: str, config: str, show: int = 3, image_tokens: int = 1) -> Dict[str, Any]:
    """The report of :func:`vlm.data.inspection.inspect_stage` for stage ``stage``, tokenised with
    its template and ``max_length``; each image counts as ``image_tokens`` placeholders when
    checking ``max_length`` (no model is built, so its own count is not known here)."""
    settings = _stage(cfg, stage, config)
    # the tokenizer saved with init_from once that stage has run, else the model config's
    init_from = settings.init_from if settings.init_from and Path(settings.init_from).is_dir() else None
    tokenizer = load_stage_tokenizer(cfg.model, init_from)
    template = build_template(settings.template or cfg.model.template, tokenizer, cfg.model.system_prompt)
    processor = VLMProcessor(tokenizer, template, image_transform=None, num_image_tokens=image_tokens,
                             image_token=cfg.model.image_token, max_length=settings.max_length)
    return inspect_stage(settings.data, processor, show=show)


def format_report(report: Dict[str, Any]) -> str:
    """``vlm data inspect``'s report as text: the JSON summary, then the rendered samples."""
    summary = {k: v for k, v in report.items() if k != "rendered"}
    lines = [json.dumps(summary, indent=2)]
    for index, text in enumerate(report["rendered"]):
        lines += [f"--- sample {index} (trained-on spans in [[ ]]) ---", text]
    return "\n".join(lines)
