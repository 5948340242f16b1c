"""LoRA adapters that plain PEFT can load: the sidecar written beside a LoRA stage's adapter.

vlm saves a LoRA stage's LLM adapter in PEFT's format (``llm_adapter/``). To load it without vlm,
``PeftModel.from_pretrained(base, adapter)`` needs the base the adapter was trained on, with the
vocabulary vlm gave it. ``record_adapter_base`` writes what that takes:

- ``adapter_config.json``'s ``base_model_name_or_path``: the pretrained LLM (``model.llm.name_or_path``)
  when the stage started from it; else ``llm_base/`` beside the adapter, a transformers folder of
  the LLM as the stage started (an LLM trained by an earlier stage, or built from ``arch``);
- ``vlm_adapter.json``: the base, its vocabulary size, the tokens vlm added (``<image>``...) and
  the size to resize to. vlm sets added rows to the mean of the old ones, so the documented
  loading is ``base.resize_token_embeddings(vocab_size, mean_resizing=False)`` then
  :func:`init_added_rows` (or just :func:`load_base`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

ADAPTER_INFO = "vlm_adapter.json"
BASE_DIR = "llm_base"


def _strip_lora(state: dict) -> dict:
    """A LoRA-wrapped model's state dict as the plain model's: adapter weights dropped,
    ``.base_layer.`` names unwrapped."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def record_adapter_base(peft_model, adapter_dir: Path, model_cfg, tokenizer, prior_llm_entries,
                        state: Optional[dict] = None) -> None:
    """Write ``adapter_dir``'s base (``base_model_name_or_path``, and ``llm_base/`` when the base
    is not a pretrained folder) and ``vlm_adapter.json`` (see the module docstring). ``state``:
    the PEFT model's full state dict gathered from shards, when its own parameters are shards."""
    adapter_dir = Path(adapter_dir)
    base = peft_model.get_base_model()
    name_or_path = model_cfg.llm.name_or_path
    if name_or_path and not prior_llm_entries:
        local = Path(name_or_path)
        base_ref = str(local.resolve()) if local.exists() else name_or_path
        from transformers import AutoConfig

        base_vocab = AutoConfig.from_pretrained(base_ref).get_text_config().vocab_size
    else:
        # the LLM this stage started from exists nowhere as a transformers folder: write it
        folder = adapter_dir.parent / BASE_DIR
        import torch

        with torch.random.fork_rng(devices=[]):  # building it must not move the run's RNG (exact resume)
            plain = type(base)(base.config)
        prefix = "base_model.model."
        base_state = base.state_dict() if state is None else {k[len(prefix):]: v for k, v in state.items()}
        plain.load_state_dict(_strip_lora(base_state), strict=True)
        plain.save_pretrained(str(folder), safe_serialization=True)
        base_ref = BASE_DIR
        base_vocab = base.get_input_embeddings().num_embeddings
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_ref if base_ref != BASE_DIR else f"../{BASE_DIR}"
    config_path.write_text(json.dumps(config, indent=2))
    vocab = base.get_input_embeddings().num_embeddings
    added = tokenizer.convert_ids_to_tokens(list(range(base_vocab, min(vocab, len(tokenizer)))))
    info = {
        "base_model_name_or_path": config["base_model_name_or_path"],
        "base_is_stage_folder": base_ref == BASE_DIR,
        "base_vocab_size": base_vocab,
        "vocab_size": vocab,
        "added_tokens": added,
        "resize": (f"model.resize_token_embeddings({vocab}, mean_resizing=False), then rows {base_vocab}.. "
                   "set to the mean of the old rows (vlm.checkpoint.peft_sidecar.init_added_rows)")
                  if vocab != base_vocab else None,
        "tokenizer": "../tokenizer",
    }
    (adapter_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2))


def init_added_rows(model, base_vocab_size: int) -> None:
    """Set embedding rows from ``base_vocab_size`` on to the mean of the rows before it (input
    and untied output embeddings), as vlm did when it added its tokens."""
    from vlm.modeling.llm import _init_new_rows

    _init_new_rows(model, base_vocab_size)


def load_base(adapter_dir: str | Path, **from_pretrained_kwargs):
    """The base an adapter written by vlm was trained on, resized as vlm resized it: ready for
    ``PeftModel.from_pretrained(base, adapter_dir)``."""
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    info = json.loads((adapter_dir / ADAPTER_INFO).read_text())
    ref = info["base_model_name_or_path"]
    path = (adapter_dir / ref).resolve() if info["base_is_stage_folder"] else ref
    model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained_kwargs)
    if info["vocab_size"] != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(info["vocab_size"], mean_resizing=False)
        init_added_rows(model, info["base_vocab_size"])
    return model
