"""``prefix_lm``: BLIP-2 stage 2 for encoder-decoder LLMs: a caption's prefix in, its suffix out."""

from __future__ import annotations

from typing import Optional

import torch

from vlm.core.errors import ConfigError
from vlm.data.batch import Batch
from vlm.data.processor import IGNORE_INDEX
from vlm.modeling.seq2seq_vlm import last_labelled_run
from vlm.training.objectives.base import Objective, StepOutput


def prefix_split_labels(labels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``labels`` with each row's last labelled run (the caption) cut at a uniformly random
    token: the part before the cut becomes -100 (so the model reads it as encoder input) and
    the suffix keeps its labels. A run of one token is kept whole (there is nothing to split)."""
    out = labels.clone()
    for row, values in enumerate(labels.tolist()):
        start, end = last_labelled_run(values)
        if end - start < 2:
            continue
        cut = start + int(torch.randint(1, end - start, (1,), generator=generator))
        out[row, start:cut] = IGNORE_INDEX
    return out


class PrefixLanguageModeling(Objective):
    """The prefix-LM objective of BLIP-2 with a FlanT5: each caption split at a random token, the
    visual tokens and the prefix to the LLM's encoder, the suffix the decoder's target. Needs an
    encoder-decoder LLM (``model.llm.kind: seq2seq``). Connector parameters the LLM path never
    reads are frozen for the stage, as for ``lm``."""

    def __init__(self, model, tokenizer):
        super().__init__()
        if not model.is_encoder_decoder:
            raise ConfigError("objective 'prefix_lm' needs an encoder-decoder LLM (model.llm.kind: seq2seq); "
                              "a causal LLM trains captions with 'lm'")

    @classmethod
    def frozen_parameters(cls, model):
        return model.connector.llm_unused_parameters()

    def forward(self, model, batch: Batch):
        inputs = batch.model_inputs()
        inputs["labels"] = prefix_split_labels(inputs["labels"])
        return StepOutput(model(**inputs, return_logits=False).loss)
