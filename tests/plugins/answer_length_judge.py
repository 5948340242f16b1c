"""A judge defined outside the vlm package, registered on import (the plugin route): longer is better."""

from __future__ import annotations

from vlm.evaluation.judges import JUDGES, Judge


@JUDGES.register("answer_length")
class AnswerLengthJudge(Judge):
    """Scores an answer by its number of characters (stripped)."""

    def score(self, sample, answers):
        return [float(len(answer.strip())) for answer in answers]
