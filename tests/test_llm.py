"""LLM loading: rows added to a pretrained LLM's embeddings for new tokens are deterministic."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES
from transformers import LlamaConfig, LlamaForCausalLM

from vlm.config import LLMConfig
from vlm.data.tokenizer_training import train_tokenizer
from vlm.modeling.llm import build_llm, load_tokenizer


@pytest.mark.parametrize("tied", [False, True])
def test_rows_added_for_new_tokens_are_the_mean_of_the_old_rows_at_every_build(tmp_path, tied):
    # A "pretrained" LLM on disk whose vocabulary lacks the image token the config asks for.
    folder = tmp_path / "llm"
    tokenizer = train_tokenizer(SENTENCES, vocab_size=300)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(str(folder))

    cfg = LLMConfig(name_or_path=str(folder))
    builds = []
    for seed in (1, 2):  # different global RNG states must not matter
        torch.manual_seed(seed)
        tok = load_tokenizer(cfg, "<patch>")
        assert len(tok) == len(tokenizer) + 1
        builds.append(build_llm(cfg, tok))
    first, second = (m.state_dict() for m in builds)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name

    model, old = builds[0], len(tokenizer)
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == old + 1
    torch.testing.assert_close(embeddings[old], embeddings[:old].mean(dim=0))
    head = model.get_output_embeddings().weight
    assert (head is embeddings) == tied
    torch.testing.assert_close(head[old], head[:old].mean(dim=0))
