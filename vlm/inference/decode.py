"""A lean greedy decode: the LLM called directly with a KV cache, rows dropping out as they finish.

transformers' ``generate`` spends most of a small model's decode step around the model call
(input preparation, logits processors, stopping criteria, output bookkeeping) and keeps
computing rows that have already stopped. This loop does only the work greedy decoding needs:
one decoder step on the still-running rows, the LM head on their last position, an argmax.
Finished rows leave the batch (and the KV cache) at once. Positions follow transformers'
left-padding convention (the cumulative attention mask), so the tokens are the ones
``generate(do_sample=False, num_beams=1)`` picks; the output has the same layout: new tokens
only, rows that stopped early padded with ``pad_token_id`` after their stop token.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from transformers import DynamicCache

from vlm.inference.seq2seq_decode import greedy_decode_seq2seq


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  pixel_values: Optional[torch.Tensor] = None, instructions: Optional[Sequence[str]] = None,
                  *, max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int,
                  image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """New token ids ``(B, T)`` of greedy decoding from left-padded prompts; ``T`` is the longest
    answer (at most ``max_new_tokens``), each row stopping after its first token in ``eos_token_ids``.

    ``image_index`` (one entry per ``<image>`` of the batch, in order) says which of
    ``pixel_values`` each one shows, so an image asked about several times is passed once.
    An encoder-decoder model's prompts go to its encoder once
    (:func:`vlm.inference.seq2seq_decode.greedy_decode_seq2seq`); they may be padded on either side."""
    if model.is_encoder_decoder:
        enc_ids, enc_mask = model.encoder_inputs(input_ids, attention_mask)
        embeds = _prompt_embeds(model, enc_ids, pixel_values, instructions, image_index)
        return greedy_decode_seq2seq(model.llm, embeds, enc_mask, max_new_tokens=max_new_tokens,
                                     eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("greedy_decode needs left padding: the last position is padding in some rows")
    inputs_embeds = _prompt_embeds(model, input_ids, pixel_values, instructions, image_index)
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.llm.config)
    return _decode_loop(model, inputs_embeds, mask, positions, cache, max_new_tokens, eos_token_ids, pad_token_id)


@torch.no_grad()
def greedy_decode_shared_prefixes(model, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                                  pixel_values: Optional[torch.Tensor], image_index: Optional[torch.Tensor],
                                  owner: torch.Tensor, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, *,
                                  max_new_tokens: int, eos_token_ids: Sequence[int],
                                  pad_token_id: int) -> torch.Tensor:
    """:func:`greedy_decode` for prompts that share prefixes: row ``r``'s prompt is prefix
    ``owner[r]`` followed by suffix ``r`` (both left-padded). Each distinct prefix (e.g. the
    template's opening and an image's visual tokens, asked several questions) runs through the
    LLM once; its KV cache is copied to the rows that share it and the suffixes continue from it.
    The attention sees the same tokens at the same positions as for the whole prompt (the
    suffix's padding, between prefix and suffix, is masked), so the tokens are greedy's."""
    if bool((suffix_mask[:, -1] == 0).any()) or bool((prefix_mask[:, -1] == 0).any()):
        raise ValueError("greedy_decode_shared_prefixes needs left-padded prefixes and suffixes")
    decoder = model.llm.get_decoder()
    cache = DynamicCache(config=model.llm.config)
    prefix_mask = prefix_mask.long()
    embeds = _prompt_embeds(model, prefix_ids, pixel_values, None, image_index)
    positions = (prefix_mask.cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
    decoder(inputs_embeds=embeds, attention_mask=prefix_mask, position_ids=positions, use_cache=True,
            **{_cache_arg(decoder): cache})
    cache.batch_select_indices(owner)  # each row gets its prefix's keys and values
    suffix_mask = suffix_mask.long()
    mask = torch.cat([prefix_mask[owner], suffix_mask], dim=1)
    start = prefix_mask.sum(-1)[owner].unsqueeze(1)
    positions = (start + suffix_mask.cumsum(-1) - 1).masked_fill(suffix_mask == 0, 0)
    embeds = model.llm.get_input_embeddings()(suffix_ids)
    return _decode_loop(model, embeds, mask, positions, cache, max_new_tokens, eos_token_ids, pad_token_id)


def _cache_arg(decoder) -> str:
    """transformers renamed the decoder's cache argument (past_key_values -> cache)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _decode_loop(model, inputs_embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache,
                 max_new_tokens: int, eos_token_ids: Sequence[int], pad_token_id: int) -> torch.Tensor:
    """Greedy steps from ``inputs_embeds`` (the prompt, or what follows the cached part) on."""
    decoder = model.llm.get_decoder()
    head = model.llm.get_output_embeddings()
    embeddings = model.llm.get_input_embeddings()
    batch, device = inputs_embeds.shape[0], inputs_embeds.device
    stops = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    out = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    cache_arg = _cache_arg(decoder)
    rows = torch.arange(batch, device=device)  # the original row of each running row
    length = 0
    for step in range(max_new_tokens):
        hidden = decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{cache_arg: cache}).last_hidden_state
        token = head(hidden[:, -1]).float().argmax(-1)
        out[rows, step] = token
        length = step + 1
        done = torch.isin(token, stops)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, token, mask, positions = rows[keep], token[keep], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        inputs_embeds = embeddings(token[:, None])
    return out[:, :length]


def _prompt_embeds(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                   instructions: Optional[Sequence[str]], image_index: Optional[torch.Tensor]) -> torch.Tensor:
    """The prompts' embeddings with visual tokens in place; distinct images encoded once unless
    the connector reads each image's question (then every occurrence is encoded with its own)."""
    if image_index is None or pixel_values is None:
        return model.embed(input_ids, pixel_values, instructions=instructions)[0]
    if getattr(model.connector, "instruction_aware", False):  # visual tokens depend on the question
        return model.embed(input_ids, pixel_values[image_index], instructions=instructions)[0]
    visual = model.encode_images(pixel_values)[image_index]
    inputs_embeds = model.llm.get_input_embeddings()(input_ids)
    placeholders = (input_ids == model.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
    if int(placeholders[..., 0].sum()) != visual.shape[0] * visual.shape[1]:
        from vlm.modeling.vlm import ImageTokenMismatch

        raise ImageTokenMismatch(f"input has {int(placeholders[..., 0].sum())} image placeholder tokens but "
                                 f"{visual.shape[0]} image(s) give {visual.shape[0] * visual.shape[1]} visual tokens")
    return inputs_embeds.masked_scatter(placeholders, visual.to(inputs_embeds.dtype))
