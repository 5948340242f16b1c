"""What the exports to transformers folders (``hf_llava``, ``hf_blip2``) share.

What the exports to transformers folders (``hf_llava``, ``hf_blip2``) share: the stage
output loaded as a transformers model in one dtype that stops generating where vlm stops, and
the folder written with its processor and ``vlm_export.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from transformers import GenerationConfig

from vlm.checkpoint.output_dirs import check_output_dir, replacing_output_dir
from vlm.data.processor import VLMProcessor
from vlm.inference.generation import stop_settings
from vlm.modeling.llm import torch_dtype

EXPORT_INFO = "vlm_export.json"


def generation_config(processor: VLMProcessor, max_new_tokens: int = 64) -> GenerationConfig:
    """Greedy decoding that stops where vlm's does: eos and the template's single-token stop
    strings as ``eos_token_id``, longer ones as ``stop_strings``."""
    settings = stop_settings(processor)
    tokenizer = processor.tokenizer
    config = GenerationConfig(eos_token_id=settings["eos_token_id"], pad_token_id=settings["pad_token_id"],
                              bos_token_id=tokenizer.bos_token_id, do_sample=False, max_new_tokens=max_new_tokens)
    if settings.get("stop_strings"):
        config.stop_strings = settings["stop_strings"]
    return config


def load_for_export(checkpoint: str | Path, out: str | Path, dtype: Optional[str], overwrite: bool,
                    to_hf: Callable[..., Any], sub_configs: Sequence[str], with_tokenizer: bool = False) -> tuple:
    """``(model, tokenizer, model_cfg, hf, target)``: the stage output ``checkpoint`` loaded on
    the CPU, and ``to_hf(model)`` in the dtype ``target`` (``dtype``, else the checkpoint's
    ``model.llm.dtype``; ``with_tokenizer``: ``to_hf(model, tokenizer)``), named so in its config and its ``sub_configs``, with the LLM's class
    as its text architecture and vlm's stops in its ``generation_config``. ``out`` is checked
    first (a non-empty folder only with ``overwrite``)."""
    from vlm.checkpoint.pretrained import load_pretrained
    from vlm.modeling.processing import build_processor

    check_output_dir(out, overwrite)
    model, tokenizer, model_cfg = load_pretrained(checkpoint, device="cpu")
    target = torch_dtype(dtype or model_cfg.llm.dtype)
    hf = (to_hf(model, tokenizer) if with_tokenizer else to_hf(model)).to(target)
    hf.config.text_config.architectures = [type(model.llm).__name__]
    for config in (hf.config, *(getattr(hf.config, name) for name in sub_configs)):
        config.dtype = target
    hf.generation_config = generation_config(build_processor(model, tokenizer, model_cfg))
    return model, tokenizer, model_cfg, hf, target


def write_export(out: str | Path, overwrite: bool, hf, processor, checkpoint: str | Path, model, model_cfg,
                 target: torch.dtype, details: Dict[str, Any]) -> Path:
    """Write ``hf`` and its ``processor`` as the folder ``out`` (atomically; a non-empty ``out``
    only with ``overwrite``), with ``EXPORT_INFO``: the source checkpoint, template, image token
    and its id, ``details``, the dtype and the stop token ids; returns ``out``."""
    with replacing_output_dir(out, overwrite) as tmp:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        # also the standalone image processor file, for readers that predate transformers 5's
        # nested processor_config.json (older transformers, vLLM)
        processor.image_processor.save_pretrained(str(tmp))
        info = {"source": str(Path(checkpoint).resolve()), "template": model_cfg.template,
                "image_token": model_cfg.image_token, "image_token_id": model.image_token_id,
                **details, "dtype": str(target).replace("torch.", ""),
                "stop_token_ids": list(hf.generation_config.eos_token_id)}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return Path(out)
