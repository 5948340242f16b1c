"""Seq2SeqVisionLanguageModel: visual tokens in front of an encoder-decoder LM's encoder (BLIP-2 T5).

The processor's contract is the causal one: a row is prompt and answer in one sequence, labels
on the trained segments, ``<image>`` expanded to K placeholders. This model splits each row:
the tokens before its last labelled run (the last answer) are the encoder input, with the
visual tokens scattered into their placeholders and the eos token appended (T5's tokenizer
ends every input with it); the last labelled run, eos appended, is the decoder's target. The
decoder starts from ``decoder_start_token_id`` (T5: pad) and the loss is transformers'
(labels shifted right inside the LM). Earlier answers of a multi-turn conversation are encoder
context, not targets.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from vlm.data.processor import IGNORE_INDEX
from vlm.modeling.vlm import VisionLanguageModel, VLMOutput


def last_labelled_run(labels: Sequence[int]) -> Tuple[int, int]:
    """``(start, end)`` of the last run of labelled (not -100) positions; ``(len, len)`` if none."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return (start, end) if end else (len(labels), len(labels))


def _with_eos(ids: List[int], eos: Optional[int]) -> List[int]:
    """``ids`` ending with ``eos`` (appended unless already last)."""
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _pad_rows(rows: Sequence[Sequence[int]], pad: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, mask)`` of ``rows`` (at least one column)."""
    width = max(1, max((len(r) for r in rows), default=0))
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        if row:
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            mask[i, :len(row)] = 1
    return ids, mask


def split_prompt_target(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: torch.Tensor,
                        eos: Optional[int], pad: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal-style rows -> ``(encoder ids, encoder mask, decoder labels)``, right-padded: the
    real tokens before each row's last labelled run, eos appended, and that run, eos appended
    (labels -100 on padding). A row without labels gives its whole prompt and no target."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    prompts, targets = [], []
    for ids, keep, row_labels in zip(input_ids.tolist(), mask.tolist(), labels.tolist()):
        start, end = last_labelled_run(row_labels)
        prompts.append(_with_eos([t for t, k in zip(ids[:start], keep[:start]) if k], eos))
        targets.append(_with_eos(row_labels[start:end], eos) if end > start else [])
    enc_ids, enc_mask = _pad_rows(prompts, pad, input_ids.device)
    dec_ids, dec_mask = _pad_rows(targets, pad, input_ids.device)
    return enc_ids, enc_mask, dec_ids.masked_fill(dec_mask == 0, IGNORE_INDEX)


def encoder_prompts(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], eos: Optional[int],
                    pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generation prompts (any padding) -> right-padded encoder ``(ids, mask)``, eos appended
    after each row's last real token."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    rows = [_with_eos([t for t, k in zip(ids, keep) if k], eos) for ids, keep in zip(input_ids.tolist(), mask.tolist())]
    return _pad_rows(rows, pad, input_ids.device)


class Seq2SeqVisionLanguageModel(VisionLanguageModel):
    """A vision encoder, a connector and an HF encoder-decoder LM (T5): visual tokens and the
    prompt enter the encoder, the decoder writes the answer."""

    is_encoder_decoder = True

    @property
    def eos_token_id(self) -> Optional[int]:
        """The eos token that ends every encoder input and decoder target."""
        return self.llm.config.eos_token_id if not isinstance(self.llm.config.eos_token_id, list) \
            else self.llm.config.eos_token_id[0]

    @property
    def pad_token_id(self) -> int:
        """The LM's pad token (T5: also the decoder's start token)."""
        return self.llm.config.pad_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        image_features: Optional[torch.Tensor] = None,
        instructions: Optional[Sequence[str]] = None,
        return_logits: bool = True,
        **llm_kwargs,
    ) -> VLMOutput:
        """The processor's rows split into encoder prompt and decoder target
        (:func:`split_prompt_target`); the loss is the LM's mean cross-entropy on the targets and
        ``logits`` are the decoder's ``(B, T_target, V)``. Packed rows are refused."""
        if llm_kwargs.get("position_ids") is not None:
            raise ValueError("an encoder-decoder LLM reads padded batches, not packed ones")
        llm_kwargs.pop("position_ids", None)
        if labels is None:
            raise ValueError("an encoder-decoder model's forward needs labels (the target); "
                             "use encoder_decoder_forward for explicit decoder inputs")
        enc_ids, enc_mask, targets = split_prompt_target(input_ids, attention_mask, labels, self.eos_token_id,
                                                         self.pad_token_id)
        return self.encoder_decoder_forward(enc_ids, enc_mask, pixel_values, labels=targets,
                                            image_features=image_features, instructions=instructions, **llm_kwargs)

    def encoder_decoder_forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                                pixel_values: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                                decoder_input_ids: Optional[torch.Tensor] = None,
                                image_features: Optional[torch.Tensor] = None,
                                instructions: Optional[Sequence[str]] = None, **llm_kwargs) -> VLMOutput:
        """The encoder on ``input_ids`` as given (visual tokens in their placeholders), the
        decoder on ``decoder_input_ids`` or on ``labels`` shifted right: transformers'
        ``Blip2ForConditionalGeneration`` with a T5 language model, term for term."""
        inputs_embeds, visual = self.embed(input_ids, pixel_values, image_features, instructions)
        if labels is not None:
            llm_kwargs.setdefault("use_cache", False)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                       decoder_input_ids=decoder_input_ids, **llm_kwargs)
        return VLMOutput(out.loss, out.logits, visual, getattr(out, "past_key_values", None))

    def encoder_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
        """A generation batch's prompts as encoder inputs (:func:`encoder_prompts`)."""
        return encoder_prompts(input_ids, attention_mask, self.eos_token_id, self.pad_token_id)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 pixel_values: Optional[torch.Tensor] = None, instructions: Optional[Sequence[str]] = None,
                 **generation_kwargs) -> torch.Tensor:
        """New token ids ``(B, T_new)`` (the decoder's start token left out) by transformers'
        generation; the prompts may be padded on either side (eos is appended to each)."""
        enc_ids, enc_mask = self.encoder_inputs(input_ids, attention_mask)
        inputs_embeds, _ = self.embed(enc_ids, pixel_values, instructions=instructions)
        out = self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=enc_mask, **generation_kwargs)
        return out[:, 1:]
