"""Log-likelihood of a continuation given a conversation and its images.

Log-likelihood of a continuation given a conversation and its images (multiple-choice and
perplexity-style evaluations, e.g. lmms-eval's ``loglikelihood`` requests).
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch

from vlm.data.batch import Collator
from vlm.data.processor import VLMProcessor
from vlm.data.types import Sample


@torch.no_grad()
def loglikelihoods(model, processor: VLMProcessor, samples: Sequence[Sample], continuations: Sequence[str],
                   batch_size: int = 8) -> List[Tuple[float, bool]]:
    """For each sample (its prompt: the turns up to the last user turn, with the template's
    generation prompt) and continuation text: ``(sum of the continuation tokens' log-probs,
    whether greedy decoding would produce exactly those tokens)``. An encoder-decoder model
    (``is_encoder_decoder``) scores the continuation as its decoder's output given the prompt
    and the visual tokens in its encoder."""
    if len(samples) != len(continuations):
        raise ValueError(f"{len(samples)} samples but {len(continuations)} continuations")
    model.eval()
    device = next(model.parameters()).device
    results: List[Tuple[float, bool]] = []
    collate = Collator(processor.tokenizer.pad_token_id, padding_side="right")
    for start in range(0, len(samples), batch_size):
        items, spans = [], []
        for sample, continuation in zip(samples[start:start + batch_size], continuations[start:start + batch_size]):
            item = processor.encode(sample, for_generation=True)
            target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not target:
                raise ValueError(f"sample {sample.id}: the continuation {continuation!r} has no tokens")
            spans.append((len(item.input_ids), len(target)))
            items.append(dataclasses.replace(item, input_ids=item.input_ids + target, labels=item.labels + target))
        batch = collate(items).to(device)
        seq2seq = model.is_encoder_decoder
        # an encoder-decoder model reads the continuation (the labelled run) as its decoder target
        logits = model(**batch.model_inputs(with_labels=seq2seq)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (context, length) in enumerate(spans):
            target = batch.input_ids[row, context:context + length]
            # causal: position t predicts token t+1; seq2seq: decoder position t predicts target t
            first = 0 if seq2seq else context - 1
            predicted = logprobs[row, first:first + length]
            total = predicted.gather(-1, target[:, None]).sum().item()
            results.append((total, bool((predicted.argmax(-1) == target).all())))
    return results
