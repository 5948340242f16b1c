"""``lm``: the model's own next-token loss on the template's trainable tokens."""

from __future__ import annotations

from vlm.data.batch import IGNORE_INDEX, Batch
from vlm.training.objectives.base import Objective, StepOutput


class LanguageModeling(Objective):
    """The model's own next-token loss. Connector parameters the LLM path never reads (the
    Q-Former's text path and stage-1 heads) are frozen for the stage."""

    supports_packing = True

    def __init__(self, model, tokenizer):
        super().__init__()

    @classmethod
    def frozen_parameters(cls, model):
        return model.connector.llm_unused_parameters()

    def forward(self, model, batch: Batch):
        loss = model(**batch.model_inputs(), return_logits=False).loss
        # the model's loss is the mean over the shifted labels that are not ignored
        return StepOutput(loss, tokens=(batch.labels[:, 1:] != IGNORE_INDEX).sum())
