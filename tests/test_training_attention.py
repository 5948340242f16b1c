"""The training attention (``vlm_sdpa``): in a CPU bf16 autocast training step it computes the
attention in fp32, honouring packed (block-diagonal) masks; elsewhere it is exactly ``sdpa``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import lora_instruct_model

from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.modeling.attention import (
    TRAINING_SDPA,
    sdpa_fp32_under_cpu_autocast,
    use_training_attention,
)
from vlm.modeling.processing import build_processor


def _qkv_and_block_mask(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=gen, requires_grad=True) for _ in range(3))
    block = torch.zeros(12, 12, dtype=torch.bool)
    block[:5, :5] = block[5:, 5:] = True
    mask = (block & torch.ones(12, 12, dtype=torch.bool).tril())[None, None].expand(2, 1, 12, 12)
    return q, k, v, mask


def test_under_cpu_autocast_the_attention_is_fp32_and_masked():
    q, k, v, mask = _qkv_and_block_mask()
    module = torch.nn.Module()
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = sdpa_fp32_under_cpu_autocast(module, q, k, v, mask, dropout=0.0)
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert ours.dtype == torch.float32 and plain.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    assert (plain.float() - reference).abs().max() > 1e-4  # autocast's own attention is bf16
    ours.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


def test_without_autocast_or_gradients_it_is_plain_sdpa():
    q, k, v, mask = _qkv_and_block_mask(1)
    module = torch.nn.Module()
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: untouched
        ours, _ = sdpa_fp32_under_cpu_autocast(module, q, k, v, mask)
        plain, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert ours.dtype == plain.dtype == torch.bfloat16
    assert torch.equal(ours, plain)
    ours, _ = sdpa_fp32_under_cpu_autocast(module, q, k, v, mask)
    plain, _ = sdpa_attention_forward(module, q, k, v, mask)
    assert torch.equal(ours, plain)


def _packed_batch(model, tokenizer, model_config, image_paths):
    processor = build_processor(model, tokenizer, model_config, template="chatml")
    samples = [
        Sample("a", [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "red")], [image_paths[0]]),
        Sample("b", [Turn("user", "describe the image briefly."), Turn("assistant", "a small red circle")], []),
        Sample("c", [Turn("user", "<image>\nwhere is it?"), Turn("assistant", "in the bottom right corner"),
                     Turn("user", "what shape is it?"), Turn("assistant", "a green triangle"),
                     Turn("user", "describe the image briefly."),
                     Turn("assistant", "the image shows a big yellow cross on a plain background")],
               [image_paths[1]]),
    ]
    return Collator(tokenizer.pad_token_id, packing=True, max_length=512)([processor.encode(s) for s in samples])


def test_a_packed_lora_training_step_matches_sdpa(tiny_model, tokenizer, model_config, image_paths):
    """The same packed bf16 step through ``sdpa`` and ``vlm_sdpa``: losses and LoRA gradients agree
    to bf16 precision, and both match the fp32 step (a dropped mask would not)."""
    batch = _packed_batch(tiny_model, tokenizer, model_config, image_paths)
    assert batch.input_ids.shape[0] < batch.num_samples, "samples must share a row"
    lora_instruct_model(tiny_model)  # as an instruct stage: connector and LoRA train
    tiny_model.train()
    inputs = batch.model_inputs()

    def step(precision):
        tiny_model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = tiny_model(**inputs, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}

    fp32_loss, fp32_grads = step("fp32")
    sdpa_loss, sdpa_grads = step("bf16")
    assert use_training_attention(tiny_model) >= 1
    assert tiny_model.llm.config._attn_implementation == TRAINING_SDPA
    ours_loss, ours_grads = step("bf16")
    torch.testing.assert_close(ours_loss, sdpa_loss, atol=2e-2, rtol=0)
    torch.testing.assert_close(ours_loss, fp32_loss, atol=2e-2, rtol=0)
    assert any("lora" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        cosine = F.cosine_similarity(grad.flatten(), fp32_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
    # fp32 is untouched by the switch: the same loss exactly
    again, _ = step("fp32")
    assert torch.equal(again, fp32_loss)


def test_only_sdpa_models_are_switched(tiny_model):
    tiny_model.llm.config._attn_implementation = "eager"
    vision_before = tiny_model.vision.model.config._attn_implementation
    changed = use_training_attention(tiny_model)
    assert tiny_model.llm.config._attn_implementation == "eager"
    assert changed == (1 if vision_before == "sdpa" else 0)
