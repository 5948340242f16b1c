"""vlm's log-likelihood call: the continuation's log-probs as generation scores them."""

from __future__ import annotations

import torch
from conftest import write_images
from PIL import Image

from vlm.data.types import Sample, Turn
from vlm.inference.chat import loglikelihood
from vlm.inference.likelihood import loglikelihoods
from vlm.modeling.processing import build_processor


def forced_logprob(model, ids, pixels, forced):
    """Sum of log-probs of ``forced`` tokens, decoding them one by one with the KV cache
    (transformers' generation, raw logits), independent of the batched forward pass."""
    steps = iter(forced)
    out = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                         max_new_tokens=len(forced), do_sample=False, eos_token_id=None, pad_token_id=0,
                         prefix_allowed_tokens_fn=lambda *_: [next(steps)], output_logits=True,
                         return_dict_in_generate=True)
    assert out.sequences[0].tolist() == forced
    return sum(torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, forced))


def test_loglikelihood_equals_generation_scores_and_flags_greedy(tiny_model, tokenizer, model_config, tmp_path):
    processor = build_processor(tiny_model, tokenizer, model_config)
    image = write_images(tmp_path / "img", sizes=[(40, 32)])[0]
    turns = [Turn("user", "<image>\nwhat color is the shape?")]
    ids, _ = processor.tokenize(turns, add_generation_prompt=True)
    pixels = processor.load_image(image)[None]
    other = "a red circle"
    forced = tokenizer(other, add_special_tokens=False)["input_ids"]
    expected = forced_logprob(tiny_model, ids, pixels, forced)
    assert abs(loglikelihood(tiny_model, processor, image, turns, other) - expected) < 1e-4

    greedy = tiny_model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                                 max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
    greedy_text = tokenizer.decode(greedy)
    assert tokenizer(greedy_text, add_special_tokens=False)["input_ids"] == greedy
    with Image.open(image) as pil:
        pil.load()
    samples = [Sample("a", turns, [pil]), Sample("b", turns, [image]), Sample("c", [Turn("user", "hi")], [])]
    results = loglikelihoods(tiny_model, processor, samples, [other, greedy_text, "the image"], batch_size=2)
    assert abs(results[0][0] - expected) < 1e-4 and results[0][1] is (forced == greedy)
    assert results[1][1] is True and results[2][0] < 0
