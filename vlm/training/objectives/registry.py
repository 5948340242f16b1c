"""``OBJECTIVES``: the training objectives a stage can name, each imported on first use."""

from __future__ import annotations

from vlm.core.registry import Registry
from vlm.training.objectives.base import Objective, ObjectiveContext

OBJECTIVES: Registry = Registry("training objective", {
    "caption_bow": "vlm.training.objectives.warmup:CaptionBagOfWords",
    "answer_words": "vlm.training.objectives.warmup:AnswerWords",
    "lm": "vlm.training.objectives.lm:LanguageModeling",
    "prefix_lm": "vlm.training.objectives.prefix_lm:PrefixLanguageModeling",
    "qformer_stage1": "vlm.training.objectives.qformer_stage1:QFormerStage1",
    "dpo": "vlm.training.objectives.preference:DPO",
    "simpo": "vlm.training.objectives.preference:SimPO",
})


def build_objective(name: str, model, tokenizer) -> Objective:
    """The objective registered as ``name`` for ``model`` (``Objective.build``)."""
    return OBJECTIVES.get(name).build(None, ObjectiveContext(model, tokenizer))
