"""VQAv2 accuracy: agreement with the official VQAEval and EvalAIAnswerProcessor (to 1e-6)."""

import copy
import json
import random

import pytest
import reference_impls

from vlm.evaluation import vqa_metric
from vlm.evaluation.vqa_metric import EvalAIAnswerProcessor, score_vqa, vqa_accuracy

# (prediction, GT answers: a list of 10, or a dict {answer: count}, answer type)
CASES = [
    ("yes.", {"yes": 10}, "yes/no"),
    ("Yes!", {"yes": 7, "no": 3}, "yes/no"),
    ("RED", {"red": 10}, "other"),
    ("Red", {"Red": 10}, "other"),  # GT never lower-cased: 0
    ("it's", {"it's": 10}, "other"),  # EvalAI splits "'s" -> "it 's": 0
    ("its", {"its": 6, "it's": 4}, "other"),
    ("dont", {"don't": 5, "no": 5}, "yes/no"),
    ("don't", {"dont": 4, "no": 6}, "yes/no"),
    ("isnt", {"isn't": 1, "no": 9}, "yes/no"),  # 1 match: 0.3
    ("whats", {"what's": 2, "what": 8}, "other"),  # 2 matches: 0.6
    ("a dog", {"dog": 6, "puppy": 4}, "other"),
    ("the dog", {"the dog": 10}, "other"),  # articles stay in GT: 0
    ("an apple", {"apple": 3, "fruit": 7}, "other"),  # 3 matches: 0.9, not 1.0
    ("two", {"2": 3, "two": 7}, "number"),  # GT number words are not mapped
    ("ten", {"10": 10}, "number"),
    ("none", {"0": 4, "none": 6}, "number"),  # 4 matches: 1.0
    ("One", {"1": 2, "one": 8}, "number"),
    ("1,000", {"1000": 5, "1,000": 5}, "number"),
    ("1000", {"1,000": 10}, "number"),  # identical GT keeps its comma: 0
    ("1,000", {"1,000": 6, "100": 4}, "number"),
    ("2.5", {"2.5": 7, "2": 3}, "number"),
    ("3.", {"3": 8, "3.0": 2}, "number"),
    ("  yes \n", {"yes": 9, "yes ": 1}, "yes/no"),
    ("\tblue\n", {"blue": 10}, "other"),
    ("red\twhite", {"red white": 5, "red and white": 5}, "other"),
    ("t-shirt", {"t-shirt": 10}, "other"),  # prediction becomes "t shirt", identical GT not: 0
    ("t-shirt", {"t-shirt": 8, "shirt": 2}, "other"),
    ("black/white", {"black and white": 5, "black/white": 3, "gray": 2}, "other"),
    ("black / white", {"black / white": 6, "gray": 4}, "other"),  # GT keeps a double space
    ("u.s.a.", {"usa": 5, "u.s.a.": 5}, "other"),
    ("yes, it is", {"yes": 10}, "yes/no"),
    ("A Dog.", {"dog": 3, "a dog": 3, "dogs": 4}, "other"),
    ("what?", {"what?": 5, "what": 5}, "other"),
    ("left (side)", {"left side": 5, "left (side)": 5}, "other"),
    ("#1", {"#1": 10}, "other"),
    ("cat", {"dog": 10}, "other"),
    ("", {"": 4, "nothing": 6}, "other"),
    ("." * 40 + "x", {"x": 5, "." * 40 + "x": 5}, "other"),  # at most 32 periods removed
    ("Mr. Smith's", {"mr smith's": 5, "smith": 5}, "other"),
]


def _expand(gt):
    return [a for a, n in gt.items() for _ in range(n)] if isinstance(gt, dict) else list(gt)


def _dataset(cases, *, answer_ids=True):
    questions, annotations, results = [], [], []
    for i, (pred, gt, answer_type) in enumerate(cases):
        qid = 1000 + i
        answers = [{"answer": a, "answer_confidence": "yes"} for a in _expand(gt)]
        if answer_ids:
            answers = [{**a, "answer_id": j + 1} for j, a in enumerate(answers)]
        questions.append({"image_id": i, "question": f"question {i}?", "question_id": qid})
        annotations.append({"question_id": qid, "image_id": i, "answers": answers,
                            "multiple_choice_answer": answers[0]["answer"],
                            "answer_type": answer_type,
                            "question_type": ("what is", "is the", "how many")[i % 3]})
        results.append({"question_id": qid, "answer": pred})
    meta = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
            "data_subtype": "val2014", "license": {}}
    return {**meta, "questions": questions}, {**meta, "annotations": annotations}, results


def _official_vqa_eval(tmp_path, questions, annotations, results):
    """Run the official VQA / VQAEval classes on JSON files; return (evalQA, accuracy)."""
    vqa_mod, eval_mod = reference_impls.load("vqa"), reference_impls.load("vqa_eval")
    paths = {}
    for name, obj in [("q", questions), ("a", annotations), ("r", results)]:
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    vqa = vqa_mod.VQA(str(paths["a"]), str(paths["q"]))
    vqa_res = vqa.loadRes(str(paths["r"]), str(paths["q"]))
    evaluator = eval_mod.VQAEval(vqa, vqa_res, n=10)
    evaluator.evaluate()
    return evaluator.evalQA, evaluator.accuracy


def _official_normalize(results):
    processor = reference_impls.load("m4c_evaluators").EvalAIAnswerProcessor()
    return [{**r, "answer": processor(r["answer"])} for r in results]


def _assert_matches_official(ours, eval_qa, accuracy):
    assert ours["num_questions"] == len(eval_qa)
    assert ours["per_question"].keys() == eval_qa.keys()
    for qid, acc in eval_qa.items():
        assert ours["per_question"][qid] == pytest.approx(acc, abs=1e-6), qid
    assert ours["overall"] == pytest.approx(accuracy["overall"], abs=1e-6)
    assert ours["per_answer_type"].keys() == accuracy["perAnswerType"].keys()
    for answer_type, acc in accuracy["perAnswerType"].items():
        assert ours["per_answer_type"][answer_type] == pytest.approx(acc, abs=1e-6)
    assert ours["per_question_type"].keys() == accuracy["perQuestionType"].keys()
    for question_type, acc in accuracy["perQuestionType"].items():
        assert ours["per_question_type"][question_type] == pytest.approx(acc, abs=1e-6)


def test_score_vqa_matches_official_with_evalai_normalisation(tmp_path):
    questions, annotations, results = _dataset(CASES)
    official = _official_vqa_eval(tmp_path, questions, annotations, _official_normalize(results))
    (tmp_path / "ours.json").write_text(json.dumps(results))
    ours = score_vqa(tmp_path / "q.json", tmp_path / "a.json", tmp_path / "ours.json")
    _assert_matches_official(ours, *official)


def test_score_vqa_matches_official_without_normalisation(tmp_path):
    questions, annotations, results = _dataset(CASES)
    official = _official_vqa_eval(tmp_path, questions, annotations, results)
    ours = score_vqa(questions, annotations, results, normalize_predictions=False)
    _assert_matches_official(ours, *official)


def test_quirks_and_partial_matches():
    # 1, 2, 3, 4 matching annotators out of 10: mean over leave-one-out subsets of min(n/3, 1).
    for n, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        assert vqa_accuracy("cat", ["cat"] * n + ["dog"] * (10 - n)) == pytest.approx(expected)
    # GT answers are processed (punctuation only) only when they are not all identical.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 9 + ["shirt"]) == 1.0
    assert vqa_accuracy("1000", ["1,000"] * 10) == 0.0
    assert vqa_accuracy("1000", ["1,000"] * 9 + ["100"]) == 1.0
    # GT answers are never lower-cased nor stripped of articles / number words.
    assert vqa_accuracy("Red", ["Red"] * 10) == 0.0
    assert vqa_accuracy("the dog", ["the dog"] * 5 + ["dog"] * 5) == 1.0
    assert vqa_accuracy("two", ["two"] * 10) == 0.0
    # EvalAI splits "'s", so "it's" never matches a GT "it's".
    assert EvalAIAnswerProcessor()("It's") == "it 's"


def test_identical_answer_records_are_left_out_together(tmp_path):
    # Without answer_id, identical answer records compare equal, and the official code leaves
    # all of them out at once: an all-"yes" question then scores 0 for "yes".
    cases = [("yes", {"yes": 10}, "yes/no"), ("yes", {"yes": 5, "no": 5}, "yes/no"),
             ("no", {"yes": 7, "no": 3}, "yes/no")]
    questions, annotations, results = _dataset(cases, answer_ids=False)
    official = _official_vqa_eval(tmp_path, questions, annotations, results)
    ours = score_vqa(questions, annotations, results, normalize_predictions=False)
    _assert_matches_official(ours, *official)
    assert ours["per_question"][1000] == 0.0


# Vocabulary for random answers: words the processors treat specially, punctuation, numbers.
_VOCAB = (
    "yes no Yes NO a an the A The dog Dog cat two Two ten none zero one 3 10 1,000 2.5 3. 0.5 "
    "dont don't isnt whats it's It's im Im ive youre yall'll somebody'd let's she's "
    "t-shirt black/white red&white left(side) u.s.a. mr. #1 100% 50/50 @home "
    "; / [ ] \" { } ( ) = + \\ _ - > < @ ` , ? ! . ... ' 's : * & ~"
).split()
_GLUE = ["", " ", " ", " ", "  ", "\n", "\t", ",", ".", "-", "/"]


def _random_strings(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(_VOCAB) + rng.choice(_GLUE) for _ in range(rng.randint(1, 5))]
        text = "".join(parts)
        if rng.random() < 0.2:
            text = rng.choice([" ", "\n", "\t", ""]) + text.upper() + rng.choice([" ", "\n", ""])
        out.append(text)
    return out


_TRICKY = ([p for p, _, _ in CASES] + [a for _, gt, _ in CASES for a in gt]
           + list(vqa_metric._CONTRACTIONS))


def test_evalai_processor_matches_official():
    official = reference_impls.load("m4c_evaluators").EvalAIAnswerProcessor()
    ours = EvalAIAnswerProcessor()
    for text in _TRICKY + _random_strings(400, seed=0) + ["." * 40, "1,,2 ,x", "a" * 3 + ".5."]:
        assert ours(text) == official(text), repr(text)


def test_answer_processing_matches_official_vqa_eval():
    official = reference_impls.load("vqa_eval").VQAEval()
    for text in _TRICKY + _random_strings(400, seed=1):
        ours_punct = vqa_metric._process_punctuation(text)
        assert ours_punct == official.processPunctuation(text), repr(text)
        ours_digits = vqa_metric._process_digit_article(text)
        assert ours_digits == official.processDigitArticle(text), repr(text)


def test_tables_match_official():
    official = reference_impls.load("vqa_eval").VQAEval()
    assert vqa_metric._CONTRACTIONS == official.contractions
    assert vqa_metric._NUMBER_WORDS == official.manualMap
    assert list(vqa_metric._PUNCTUATION) == official.punct
    assert set(vqa_metric._ARTICLES) == set(official.articles)


def test_random_questions_match_official(tmp_path):
    rng = random.Random(2)
    pool = _random_strings(60, seed=3) + ["yes", "no", "2", "two", "red", "t-shirt", "1,000"]
    cases = []
    for _ in range(300):
        options = rng.sample(pool, rng.randint(1, 4))
        gt = [rng.choice(options) for _ in range(10)]
        pred = rng.choice(options + pool[:5]) if rng.random() < 0.9 else rng.choice(pool)
        cases.append((pred, gt, rng.choice(["yes/no", "number", "other"])))
    questions, annotations, results = _dataset(cases)
    official = _official_vqa_eval(tmp_path, questions, annotations, _official_normalize(results))
    _assert_matches_official(score_vqa(questions, annotations, results), *official)


# ---------------------------------------------------------------- input validation


@pytest.fixture
def small():
    return _dataset(CASES[:4])


def test_unknown_question_id_names_id_and_file(tmp_path, small):
    questions, annotations, results = small
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(annotations))
    results[1]["question_id"] = 424242
    with pytest.raises(ValueError, match=r"424242.*annotations file .*annotations\.json"):
        score_vqa(questions, path, results)


def test_duplicate_result(small):
    questions, annotations, results = small
    with pytest.raises(ValueError, match="question_id 1002 appears more than once"):
        score_vqa(questions, annotations, results + [dict(results[2])])


def test_result_missing_key(small):
    questions, annotations, results = small
    del results[0]["answer"]
    with pytest.raises(ValueError, match=r"result #0 .*missing key\(s\) \['answer'\]"):
        score_vqa(questions, annotations, results)


def test_results_not_a_list(tmp_path, small):
    questions, annotations, _ = small
    path = tmp_path / "res.json"
    path.write_text(json.dumps({"1000": "yes"}))
    with pytest.raises(ValueError, match=r"results file .*res\.json.* must be a JSON list"):
        score_vqa(questions, annotations, path)


def test_missing_results_error_unless_allowed(small):
    questions, annotations, results = small
    with pytest.raises(ValueError, match=r"2 of 4 questions .* question_id \[1001, 1003\]"):
        score_vqa(questions, annotations, results[::2])
    subset = score_vqa(questions, annotations, results[::2], allow_missing=True)
    full = score_vqa(questions, annotations, results)
    assert subset["num_questions"] == 2
    assert subset["per_question"] == {q: full["per_question"][q] for q in (1000, 1002)}


def test_bad_annotations(small):
    questions, annotations, results = small
    broken = copy.deepcopy(annotations)
    del broken["annotations"][0]["answers"]
    with pytest.raises(ValueError, match=r"annotation #0 .*missing key\(s\) \['answers'\]"):
        score_vqa(questions, broken, results)
    with pytest.raises(ValueError, match="question_id 1000 appears twice"):
        score_vqa(questions, {"annotations": annotations["annotations"] * 2}, results)
    with pytest.raises(ValueError, match="must be a JSON object whose 'annotations' is a list"):
        score_vqa(questions, annotations["annotations"], results)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one ground-truth answer"):
        vqa_accuracy("yes", [])
