"""Training objectives: the contract (``Objective``, ``StepOutput``) and ``OBJECTIVES``.

Training objectives: the contract (``Objective``, ``StepOutput``) and the registry
``OBJECTIVES`` (``lm``, ``caption_bow``, ``answer_words``, ``qformer_stage1``, ``dpo``,
``simpo``).
"""

from vlm.training.objectives.base import Objective, ObjectiveContext, StepOutput
from vlm.training.objectives.registry import OBJECTIVES, build_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveContext", "StepOutput", "build_objective"]
