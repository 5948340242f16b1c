"""The labelled-only loss (LM head and cross-entropy on labelled positions only) equals the LLM's
full loss, with and without LoRA, and leaves logits-returning calls unchanged."""

from __future__ import annotations

import torch

from vlm.config import LoraConfig
from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.modeling.processing import build_processor
from vlm.training.stages import add_lora


def _batch(model, tokenizer, model_config, image_paths):
    processor = build_processor(model, tokenizer, model_config, template="chatml")
    samples = [
        Sample("a", [Turn("user", "<image>\nWhat color is the shape?"), Turn("assistant", "red")], [image_paths[0]]),
        Sample("b", [Turn("user", "describe the image briefly."), Turn("assistant", "a small red circle in the center")], []),
        Sample("c", [Turn("user", "<image>\nwhere is it?"), Turn("assistant", "in the bottom right corner"),
                     Turn("user", "what shape is it?"), Turn("assistant", "a green triangle")], [image_paths[1]]),
    ]
    return Collator(tokenizer.pad_token_id)([processor.encode(s) for s in samples])


def _both_losses(model, batch):
    full = model(**batch.model_inputs())
    labelled = model(**batch.model_inputs(), return_logits=False)
    assert full.logits is not None and labelled.logits is None
    return full.loss, labelled.loss


def test_labelled_only_loss_equals_the_full_loss(tiny_model, tokenizer, model_config, image_paths):
    batch = _batch(tiny_model, tokenizer, model_config, image_paths)
    assert (batch.attention_mask == 0).any(), "the batch must hold padding"
    with torch.no_grad():
        full, labelled = _both_losses(tiny_model, batch)
    torch.testing.assert_close(labelled, full, atol=1e-6, rtol=0)


def test_labelled_only_loss_through_lora_matches_loss_and_gradients(tiny_model, tokenizer, model_config, image_paths):
    batch = _batch(tiny_model, tokenizer, model_config, image_paths)
    tiny_model.llm.requires_grad_(False)
    tiny_model.llm = add_lora(tiny_model.llm, LoraConfig(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so a path that skipped them would differ
        for name, param in tiny_model.llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    grads = []
    for return_logits in (True, False):
        tiny_model.zero_grad(set_to_none=True)
        loss = tiny_model(**batch.model_inputs(), return_logits=return_logits).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None}))
    (full, full_grads), (labelled, labelled_grads) = grads
    torch.testing.assert_close(labelled, full, atol=1e-6, rtol=0)
    assert full_grads.keys() == labelled_grads.keys() and any("lora" in n for n in full_grads)
    for name in full_grads:
        torch.testing.assert_close(labelled_grads[name], full_grads[name], atol=1e-6, rtol=1e-5)
