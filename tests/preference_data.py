"""Preference pairs for the tests, written from the synthetic shapes' VQA questions."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def write_vqa_pairs(split: dict, path: Path, limit: int = 0) -> Path:
    """``preference_json`` pairs from ``split``'s VQA data: the reference answer chosen, another
    answer to the same kind of question rejected (the first different one, so it is deterministic)."""
    questions = json.load(open(split["questions"]))["questions"]
    annotations = {a["question_id"]: a for a in json.load(open(split["annotations"]))["annotations"]}
    by_question = defaultdict(set)
    for q in questions:
        by_question[q["question"]].add(annotations[q["question_id"]]["multiple_choice_answer"])
    records = []
    for q in questions:
        answer = annotations[q["question_id"]]["multiple_choice_answer"]
        others = sorted(by_question[q["question"]] - {answer})
        if not others:
            continue
        records.append({"id": str(q["question_id"]), "image": split["image_pattern"].format(image_id=q["image_id"]),
                        "conversations": [{"from": "human", "value": "<image>\n" + q["question"]}],
                        "chosen": answer, "rejected": others[0]})
    records = records[:limit] if limit else records
    path.write_text(json.dumps(records, indent=1))
    return path
