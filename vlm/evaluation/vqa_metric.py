"""Official VQAv2 accuracy, reproduced (quirks included) from the VQA evaluation code.

Behaviour follows ``vqaEval.py`` of GT-Vision-Lab/VQA (shipped identically in salesforce-lavis as
``lavis/common/vqa_tools/vqa_eval.py``) and, for prediction normalisation, EvalAI's answer
processor (``mmf/utils/m4c_evaluators.py``, used by LLaVA before the official evaluation). The
tests in ``tests/test_vqa_metric.py`` check agreement with both reference files.

Official quirks reproduced on purpose:

* The prediction always goes through punctuation and digit/article processing; the ground-truth
  answers only get *punctuation* processing (never lower-casing, number words or articles), and
  only when the ten answers are not all identical.
* Whether a punctuation mark is deleted or turned into a space depends on the unprocessed text:
  deleted if any mark has a space beside it, or if the text has a comma between two digits.
* ``re.sub`` receives ``re.UNICODE`` (== 32) as its ``count`` argument, so at most 32 periods are
  removed from an answer.
* Leave-one-out compares whole answer records, so identical records (e.g. answers without
  ``answer_id``) are left out together.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from vlm.core.errors import DataFormatError
from vlm.evaluation.results_file import load_json, record_list, require, results_by_id

__all__ = ["EvalAIAnswerProcessor", "vqa_accuracy", "score_vqa"]

# Data tables of the official code (identical in vqaEval.py and m4c_evaluators.py), including its
# oddities such as the reversed "somebody'd" entry and the unreachable capitalised keys.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# Official pattern: r"(?!<=\d)(\.)(?!\d)". Its first group is a lookahead (not a lookbehind) that
# always succeeds in front of a ".", so it means: a period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = int(re.UNICODE)  # the official code passes re.UNICODE (32) as `count`
# vqaEval.py's r"(\d)(,)(\d)". (EvalAI's variant r"(?<=\d)(\,)+(?=\d)" never sees a comma: its
# processor deletes them all first.)
_DIGIT_COMMA = re.compile(r"\d,\d")


def _process_punctuation(text: str) -> str:
    drop = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The decision looks at the unprocessed text, not at `out`.
        if drop or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


class EvalAIAnswerProcessor:
    """EvalAI's VQA answer normaliser (MMF ``m4c_evaluators.EvalAIAnswerProcessor``): str -> str.

    Lower-cases, deletes commas and question marks, splits off "'s", then applies the official
    punctuation and number-word/article/contraction processing.
    """

    def __call__(self, answer: str) -> str:
        text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
        text = text.replace("\n", " ").replace("\t", " ").strip()
        return _process_digit_article(_process_punctuation(text))


def _prepare_prediction(prediction: str) -> str:
    text = prediction.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _prepare_gt_answers(gt_answers: list[str]) -> list[str]:
    if len(set(gt_answers)) > 1:
        return [_process_punctuation(answer) for answer in gt_answers]
    return list(gt_answers)


def _leave_one_out_accuracy(prediction: str, answers: list[str], records: list) -> float:
    """Official formula on prepared answers; ``records[i]`` identifies answer i when left out."""
    accs = []
    for left_out in records:
        matches = sum(1 for record, answer in zip(records, answers)
                      if record != left_out and answer == prediction)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Official VQAv2 accuracy in [0, 1] of one prediction against its (ten) GT answers.

    The mean over leave-one-out subsets of ``min(#matches / 3, 1)``, with the official answer
    processing (see the module docstring). The prediction is not EvalAI-normalised here.
    """
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    answers = _prepare_gt_answers(list(gt_answers))
    positions = list(range(len(answers)))
    return _leave_one_out_accuracy(_prepare_prediction(prediction), answers, positions)


def _index_annotations(annotations: list, label: str) -> dict:
    by_id = {}
    for i, ann in enumerate(annotations):
        require(ann, ("question_id", "answers", "answer_type"), f"annotation #{i} in {label}")
        qid = ann["question_id"]
        if qid in by_id:
            raise DataFormatError(f"question_id {qid!r} appears twice in {label}")
        answers = ann["answers"]
        if not isinstance(answers, list) or not answers:
            raise DataFormatError(f"question_id {qid!r} in {label} has no answers")
        for ans in answers:
            require(ans, ("answer",), f"an answer of question_id {qid!r} in {label}")
            if not isinstance(ans["answer"], str):
                raise DataFormatError(f"question_id {qid!r} in {label} has a non-string answer: {ans!r}")
        by_id[qid] = ann
    return by_id


def _index_results(results: Any, label: str, questions: set, q_label: str,
                   annotations: dict, a_label: str) -> dict:
    def known(i: int, qid: Any) -> bool:
        if qid not in annotations:
            raise DataFormatError(f"result question_id {qid!r} (result #{i} in {label}) "
                             f"is not in {a_label}")
        if qid not in questions:
            raise DataFormatError(f"result question_id {qid!r} (result #{i} in {label}) "
                             f"is not in {q_label}")
        return True

    return results_by_id(results, label, "question_id", "answer", known)


def score_vqa(questions, annotations, results, *, normalize_predictions: bool = True,
              allow_missing: bool = False) -> dict:
    """Score VQAv2-format results with the official accuracy.

    ``questions``, ``annotations`` and ``results`` are paths to the VQAv2 JSON files or the loaded
    objects. Predictions are EvalAI-normalised first (as LLaVA does) unless
    ``normalize_predictions=False``. Every question must have a result unless
    ``allow_missing=True``, in which case only the answered questions are scored.

    Returns ``{"overall", "per_question": {question_id: acc}, "per_answer_type": {type: acc},
    "per_question_type": {type: acc}, "num_questions"}`` with accuracies in percent, not rounded
    (``per_question_type`` from the annotations' ``question_type``, as the official code reports).
    """
    q_obj, q_label = load_json(questions, "questions")
    a_obj, a_label = load_json(annotations, "annotations")
    r_obj, r_label = load_json(results, "results")

    question_ids, seen = [], set()
    for i, question in enumerate(record_list(q_obj, "questions", q_label)):
        require(question, ("question_id",), f"question #{i} in {q_label}")
        qid = question["question_id"]
        if qid in seen:
            raise DataFormatError(f"question_id {qid!r} appears twice in {q_label}")
        seen.add(qid)
        question_ids.append(qid)
    anns = _index_annotations(record_list(a_obj, "annotations", a_label), a_label)
    unannotated = [qid for qid in question_ids if qid not in anns]
    if unannotated:
        raise DataFormatError(f"{len(unannotated)} question(s) of {q_label} have no annotation in "
                         f"{a_label}, e.g. question_id {unannotated[:5]}")
    predictions = _index_results(r_obj, r_label, set(question_ids), q_label, anns, a_label)

    missing = [qid for qid in question_ids if qid not in predictions]
    if missing and not allow_missing:
        raise DataFormatError(f"{len(missing)} of {len(question_ids)} questions in {q_label} have no "
                         f"result in {r_label}, e.g. question_id {missing[:5]}; pass "
                         f"--allow-missing (vlm score) / allow_missing=True to score only the answered subset")
    if not predictions:
        raise DataFormatError(f"{r_label} contains no results to score")

    normalize = EvalAIAnswerProcessor() if normalize_predictions else (lambda answer: answer)
    accs, per_question, per_type, per_question_type = [], {}, defaultdict(list), defaultdict(list)
    for qid in question_ids:
        if qid not in predictions:
            continue
        ann = anns[qid]
        answers = _prepare_gt_answers([a["answer"] for a in ann["answers"]])
        # The official code leaves out GT answers by comparing the (processed) answer records.
        records = [{**a, "answer": p} for a, p in zip(ann["answers"], answers)]
        prediction = _prepare_prediction(normalize(predictions[qid]))
        acc = _leave_one_out_accuracy(prediction, answers, records)
        accs.append(acc)
        per_question[qid] = 100 * acc
        per_type[ann["answer_type"]].append(acc)
        if "question_type" in ann:  # VQAv2 always has it; the official code reports it per type too
            per_question_type[ann["question_type"]].append(acc)

    return {
        "overall": 100 * sum(accs) / len(accs),
        "per_question": per_question,
        "per_answer_type": {t: 100 * sum(v) / len(v) for t, v in per_type.items()},
        "per_question_type": {t: 100 * sum(v) / len(v) for t, v in per_question_type.items()},
        "num_questions": len(per_question),
    }
