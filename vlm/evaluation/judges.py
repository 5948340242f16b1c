"""Judges that score a model's sampled answers for preference pairs: ``JUDGES`` (``vqa_accuracy``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, List, Mapping, Optional, Sequence

from vlm.core.errors import DataFormatError
from vlm.core.registry import Registry
from vlm.data.types import Sample
from vlm.evaluation.vqa_metric import vqa_accuracy


@dataclass(frozen=True)
class JudgeContext:
    """What a judge is built for: nothing yet (the component protocol's build context)."""


class Judge:
    """Scores answers to one sample; higher is better. A plug-in subclasses it and registers
    with ``@JUDGES.register("name")`` in a module named by the run config's ``plugins:``."""

    Options: ClassVar[Optional[type]] = None

    @classmethod
    def build(cls, options: Optional[Mapping[str, Any]], ctx: Optional[JudgeContext]) -> "Judge":
        """The judge (``options``: its ``Options`` fields)."""
        return cls(**dict(options or {}))

    @classmethod
    def check(cls, cfg: Any, where: str) -> None:
        """The config rules of the judge's section (none by default)."""

    def score(self, sample: Sample, answers: Sequence[str]) -> List[float]:
        """One score per answer to ``sample``."""
        raise NotImplementedError


JUDGES: Registry[Judge] = Registry("judge")


@JUDGES.register("vqa_accuracy")
class VQAAccuracyJudge(Judge):
    """The official VQAv2 accuracy of each answer against the sample's reference answers
    (``meta["answers"]``, as the ``vqav2`` reader gives them)."""

    def score(self, sample: Sample, answers: Sequence[str]) -> List[float]:
        references = sample.meta.get("answers")
        if not references:
            raise DataFormatError(f"{sample.meta.get('source', sample.id)}: judge 'vqa_accuracy' needs the "
                                  "reference answers (a vqav2 dataset with annotations_path)")
        return [vqa_accuracy(answer, list(references)) for answer in answers]
