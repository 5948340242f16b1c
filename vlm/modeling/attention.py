"""Training attention: transformers' ``sdpa``, with the kernel kept in fp32 under CPU autocast.

CPU autocast runs ``scaled_dot_product_attention`` in bf16, and torch's CPU flash-attention
*backward* is far slower in bf16 than in fp32 (measured on a Sapphire Rapids core, torch 2.14:
14 ms vs 3.4 ms for 10 x 4 heads x 130 tokens x 48; 25 ms vs 18 ms at 8 x 8 x 240 x 64), while
the forward is cheap either way. :func:`sdpa_fp32_under_cpu_autocast` is transformers'
``sdpa_attention_forward`` run with autocast off on fp32 queries, keys and values whenever it
is called on CPU, under autocast, with gradients enabled (a training step); everywhere else
(GPU, fp32, inference) it is exactly ``sdpa``. The linears around it still run in bf16.

:func:`use_training_attention` switches the Hugging Face sub-models of a model that use
``sdpa`` to it (registered as :data:`TRAINING_SDPA`, with ``sdpa``'s mask builder); the
training loop calls it. Checkpoints and exported ``config.json`` files do not record the
attention implementation, so a saved model loads with plain ``sdpa``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

TRAINING_SDPA = "vlm_sdpa"


def sdpa_fp32_under_cpu_autocast(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attention_mask: Optional[torch.Tensor], **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention; in a CPU autocast training step, computed in fp32."""
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.is_grad_enabled():
        with torch.autocast("cpu", enabled=False):
            return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(TRAINING_SDPA, sdpa_fp32_under_cpu_autocast)
ALL_MASK_ATTENTION_FUNCTIONS.register(TRAINING_SDPA, sdpa_mask)  # the same masks as sdpa


def use_training_attention(model: nn.Module) -> int:
    """Switch every sub-model config of ``model`` whose attention is ``sdpa`` to
    :data:`TRAINING_SDPA`; returns how many configs changed. Other implementations (eager,
    flash-attention, flex) are left alone."""
    changed = 0
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        for sub in _configs(config):
            if getattr(sub, "_attn_implementation", None) == "sdpa":
                sub._attn_implementation = TRAINING_SDPA
                changed += 1
    return changed


def _configs(config: PretrainedConfig):
    """``config`` and its sub-configs (a multimodal LLM's text config, ...)."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if isinstance(sub, PretrainedConfig):
            yield sub
