"""The lean greedy decode for encoder-decoder LLMs: the encoder run once, a KV cache in the decoder.

The prompts' embeddings (visual tokens in place, eos appended, as ``Seq2SeqVisionLanguageModel``
builds them) go through the encoder once; the decoder then starts from ``decoder_start_token_id``
and takes one token per step against its self-attention cache and the fixed encoder states. Rows
that stop leave the batch (cache, encoder states and mask) at once. The tokens are those of
transformers' greedy ``generate`` without its leading start token; rows that stopped early are
padded with ``pad_token_id`` after their stop token.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutput


@torch.no_grad()
def greedy_decode_seq2seq(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                          eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """New token ids ``(B, T)`` of greedy decoding by the encoder-decoder ``llm`` (``T`` the
    longest answer, at most ``max_new_tokens``) from the encoder's input embeddings and mask."""
    states = llm.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
    batch, device = states.shape[0], states.device
    stops = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    token = torch.full((batch,), llm.config.decoder_start_token_id, dtype=torch.long, device=device)
    rows, mask = torch.arange(batch, device=device), attention_mask
    cache, length = None, 0
    for step in range(max_new_tokens):
        result = llm(encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
                     decoder_input_ids=token[:, None], cache=cache, use_cache=True)
        cache = result.past_key_values
        token = result.logits[:, -1].float().argmax(-1)
        out[rows, step] = token
        length = step + 1
        done = torch.isin(token, stops)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, token, states, mask = rows[keep], token[keep], states[keep], mask[keep]
    return out[:, :length]
