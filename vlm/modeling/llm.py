"""The LLM: a transformers causal or encoder-decoder LM and its tokenizer, frozen, LoRA or full."""

from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vlm.config import LLM_KINDS, ConfigError, LLMConfig, LoraConfig
from vlm.modeling.dtypes import DTYPES


def torch_dtype(name: str) -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16``; a clear error for unknown names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"model.llm.dtype: unknown dtype '{name}'; use one of {sorted(DTYPES)}") from None


@contextlib.contextmanager
def _remote_code_refused(source: str, key: str):
    """transformers' refusal to run a model's own code (``trust_remote_code`` off) as one
    ConfigError naming ``key`` and ``source``; other errors pass through."""
    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(f"{key}: {source} needs its own Python code to load, which vlm does not run "
                          "unless asked: read that code, then set model.llm.trust_remote_code: true in your "
                          "config (or pass --trust-remote-code)") from None


def _plain_arch(cfg: LLMConfig) -> dict:
    """``cfg.arch`` as plain Python values (nested mappings and lists too, as transformers'
    configs check their field types)."""
    return OmegaConf.to_container(cfg.arch, resolve=True) if isinstance(cfg.arch, DictConfig) else dict(cfg.arch)


def llm_kind(cfg: LLMConfig) -> str:
    """``causal`` or ``seq2seq``: ``cfg.kind``, or for ``auto`` the model config's
    ``is_encoder_decoder`` (inline ``arch`` or the ``name_or_path`` folder's config.json)."""
    if cfg.kind not in LLM_KINDS:
        raise ConfigError(f"model.llm.kind: unknown kind '{cfg.kind}'; use one of {list(LLM_KINDS)}")
    if cfg.kind != "auto":
        return cfg.kind
    if cfg.name_or_path:
        with _remote_code_refused(cfg.name_or_path, "model.llm.name_or_path"):
            config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    else:
        arch = _plain_arch(cfg)
        try:
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"model.llm.arch.model_type: {exc}") from None
    return "seq2seq" if config.is_encoder_decoder else "causal"


def load_tokenizer(cfg: LLMConfig, image_token: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer (``cfg.tokenizer``, else ``cfg.name_or_path``) and add the image token.

    A tokenizer without a pad token pads with its unk (else eos) token, as LLaVA does.
    """
    source = cfg.tokenizer or cfg.name_or_path
    if source is None:
        raise ConfigError("model.llm.tokenizer: an inline LLM needs a tokenizer path")
    with _remote_code_refused(source, "model.llm.tokenizer" if cfg.tokenizer else "model.llm.name_or_path"):
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load the LM (causal, or encoder-decoder for ``kind: seq2seq``) from ``name_or_path`` or
    build it from ``arch``.

    An inline ``arch`` without ``vocab_size`` takes the tokenizer's size, and its special token
    ids from the tokenizer (an encoder-decoder's decoder starts from pad, as T5's). The
    embeddings grow to fit the tokenizer when it is larger.
    """
    dtype = torch_dtype(cfg.dtype)
    auto = AutoModelForSeq2SeqLM if llm_kind(cfg) == "seq2seq" else AutoModelForCausalLM
    if cfg.name_or_path:
        with _remote_code_refused(cfg.name_or_path, "model.llm.name_or_path"):
            model = auto.from_pretrained(
                cfg.name_or_path,
                dtype=dtype,
                attn_implementation=cfg.attn_implementation,
                trust_remote_code=cfg.trust_remote_code,
            )
    else:
        arch = _plain_arch(cfg)
        model_type = arch.pop("model_type")
        arch.setdefault("vocab_size", len(tokenizer))
        for name in ("pad", "bos", "eos"):
            token_id = getattr(tokenizer, f"{name}_token_id")
            if token_id is not None:
                arch.setdefault(f"{name}_token_id", token_id)
        if auto is AutoModelForSeq2SeqLM and tokenizer.pad_token_id is not None:
            arch.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
        try:
            config = AutoConfig.for_model(model_type, **arch)
        except ValueError as exc:
            raise ConfigError(f"model.llm.arch.model_type: {exc}") from None
        if cfg.attn_implementation:
            config._attn_implementation = cfg.attn_implementation
        model = auto.from_config(config, dtype=dtype)
    old_size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > old_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows(model, old_size)
    return model


@torch.no_grad()
def _init_new_rows(model: PreTrainedModel, old_size: int) -> None:
    """Set the embedding rows added by a resize (e.g. ``<image>`` on a pretrained LLM) to the mean
    of the old rows, in the input embeddings and, when untied, the output embeddings.

    Random new rows would differ at every build, so a model rebuilt from a checkpoint that did
    not save the LLM would not match the model that was trained.
    """
    inputs = model.get_input_embeddings().weight
    tensors = [inputs]
    outputs = model.get_output_embeddings()
    if outputs is not None and outputs.weight is not inputs:
        tensors.append(outputs.weight)
        if getattr(outputs, "bias", None) is not None:
            tensors.append(outputs.bias)
    for tensor in tensors:
        tensor[old_size:] = tensor[:old_size].float().mean(dim=0).to(tensor.dtype)


def add_lora(model: PreTrainedModel, cfg: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; by default on every linear layer except lm_head (an
    encoder-decoder's in its encoder and its decoder)."""
    target = list(cfg.target_modules) if cfg.target_modules else "all-linear"
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target,
        task_type="SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)
