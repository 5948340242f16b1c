"""Dataset readers: LLaVA JSON/JSONL, COCO captions (official and Karpathy), VQAv2."""

import json
import os

import pytest

from vlm.data.formats import (
    READERS,
    DataFormatError,
    read_coco_captions,
    read_dataset,
    read_jsonl,
    read_llava_json,
    read_vqav2,
)


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def conv(*pairs):
    return [{"from": who, "value": value} for who, value in pairs]


# ------------------------------------------------------------------------------------------
# LLaVA JSON


def test_llava_json_roles_images_and_sources(tmp_path):
    path = write_json(
        tmp_path / "llava.json",
        [
            {
                "id": "a",
                "image": "x/1.jpg",
                "conversations": conv(
                    ("human", "<image>\nWhat is it?"),
                    ("gpt", "A cat."),
                    ("user", "Colour?"),
                    ("assistant", "Black."),
                ),
            },
            {
                "id": 7,
                "image": ["/abs/1.jpg", "2.jpg"],
                "conversations": conv(
                    ("system", "Be brief."), ("human", "<image> vs <image>?"), ("gpt", "Same.")
                ),
            },
            {"id": "text", "conversations": conv(("human", "Hi"), ("gpt", "Hello"))},
        ],
    )
    with pytest.raises(DataFormatError, match=r"#1: field 'image': image '/abs/1.jpg' is outside image_root"):
        read_llava_json(path, image_root="/data")
    a, b, text = read_llava_json(path, image_root="/data", allow_outside_root=True)
    assert [t.role for t in a.turns] == ["user", "assistant", "user", "assistant"]
    assert a.turns[0].content == "<image>\nWhat is it?"
    assert a.images == [os.path.join("/data", "x/1.jpg")]
    assert a.meta["source"] == f"{path}#0"
    assert b.id == "7" and [t.role for t in b.turns] == ["system", "user", "assistant"]
    assert b.images == ["/abs/1.jpg", os.path.join("/data", "2.jpg")]  # absolute path kept when allowed
    assert text.images == [] and text.meta["source"] == f"{path}#2"


def test_llava_json_inserts_missing_image_marker(tmp_path):
    path = write_json(
        tmp_path / "llava.json",
        [
            {
                "id": "a",
                "image": "1.jpg",
                "conversations": conv(
                    ("system", "sys"), ("human", "What is it?"), ("gpt", "A dog.")
                ),
            },
        ],
    )
    (sample,) = read_llava_json(path)
    assert sample.turns[0].content == "sys"
    assert sample.turns[1].content == "<image>\nWhat is it?"
    assert sample.images == ["1.jpg"]


@pytest.mark.parametrize(
    "record, expected",
    [
        (
            {"id": "a", "conversations": conv(("bot", "x"), ("gpt", "y"))},
            ["#1", "conversations[0].from", "bot"],
        ),
        ({"id": "a", "image": "1.jpg"}, ["#1", "missing field 'conversations'"]),
        ({"id": "a", "conversations": []}, ["#1", "'conversations' is empty"]),
        (
            {"id": "a", "conversations": conv(("gpt", "x"), ("human", "y"))},
            ["#1", "conversations[0].from", "expected role 'user'"],
        ),
        (
            {"id": "a", "conversations": conv(("human", "x"), ("human", "y"), ("gpt", "z"))},
            ["#1", "conversations[1].from", "expected role 'assistant'"],
        ),
        (
            {"id": "a", "conversations": conv(("human", "x"), ("gpt", "y"), ("human", "z"))},
            ["#1", "conversations[2]", "ends with a user turn"],
        ),
        (
            {
                "id": "a",
                "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}],
            },
            ["#1", "conversations[0].value", "int"],
        ),
        (
            {
                "id": "a",
                "image": "1.jpg",
                "conversations": conv(("human", "<image><image>"), ("gpt", "y")),
            },
            ["#1", "2 '<image>' marker(s)", "1 image(s)"],
        ),
        (
            {"id": "a", "conversations": conv(("human", "<image> x"), ("gpt", "y"))},
            ["#1", "1 '<image>' marker(s)", "0 image(s)"],
        ),
        (
            {"id": "a", "image": 5, "conversations": conv(("human", "x"), ("gpt", "y"))},
            ["#1", "field 'image'"],
        ),
    ],
)
def test_llava_json_errors_name_file_index_and_field(tmp_path, record, expected):
    good = {"id": "ok", "conversations": conv(("human", "x"), ("gpt", "y"))}
    path = write_json(tmp_path / "bad.json", [good, record])
    with pytest.raises(DataFormatError) as info:
        read_llava_json(path)
    message = str(info.value)
    assert message.startswith(path)
    for part in expected:
        assert part in message


def test_llava_json_invalid_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": "a",\n "conversations": ]\n')
    with pytest.raises(DataFormatError, match=r"broken\.json:3: invalid JSON"):
        read_llava_json(str(path))


# ------------------------------------------------------------------------------------------
# JSONL


def test_jsonl_text_only_llava_lines_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "a red circle"}),
        "",
        "   ",
        json.dumps(
            {
                "id": "c1",
                "image": "1.png",
                "conversations": conv(("human", "Describe."), ("gpt", "A circle.")),
            }
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    text, chat = read_jsonl(str(path), image_root="root")
    assert [(t.role, t.content) for t in text.turns] == [("assistant", "a red circle")]
    assert text.images == [] and text.meta == {"source": f"{path}:1", "text_only": True}
    assert chat.id == "c1" and chat.meta["source"] == f"{path}:4"
    assert chat.turns[0].content == "<image>\nDescribe."
    assert chat.images == [os.path.join("root", "1.png")]


def test_jsonl_errors_name_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n\n" + '{"text": "unterminated}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: invalid JSON"):
        read_jsonl(str(path))

    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"caption": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: expected field 'conversations'"):
        read_jsonl(str(path))

    path.write_text(json.dumps({"conversations": conv(("human", "x"), ("robot", "y"))}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: field 'conversations\[1\]\.from'"):
        read_jsonl(str(path))


# ------------------------------------------------------------------------------------------
# COCO captions

COCO = {
    "info": {},
    "licenses": [],
    "type": "captions",
    "images": [
        {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
        {"id": 7, "file_name": "COCO_val2014_000000000007.jpg"},
    ],
    "annotations": [
        {"id": 1, "image_id": 42, "caption": "A dog runs. \n"},
        {"id": 2, "image_id": 7, "caption": "A cat sleeps."},
        {"id": 3, "image_id": 42, "caption": "A brown dog."},
    ],
}

KARPATHY = {
    "dataset": "coco",
    "images": [
        {
            "filepath": "val2014",
            "filename": "a.jpg",
            "imgid": 0,
            "cocoid": 391895,
            "split": "test",
            "sentences": [
                {"raw": "A man rides.", "tokens": ["a", "man", "rides"], "sentid": 10},
                {"raw": "A biker.", "tokens": ["a", "biker"], "sentid": 11},
            ],
        },
        {
            "filepath": "train2014",
            "filename": "b.jpg",
            "imgid": 1,
            "split": "train",
            "sentences": [{"raw": "Two birds.", "tokens": ["two", "birds"]}],
        },
        {
            "filepath": "val2014",
            "filename": "c.jpg",
            "imgid": 2,
            "cocoid": 5,
            "split": "restval",
            "sentences": [{"raw": "A bus.", "tokens": ["a", "bus"]}],
        },
    ],
}


def test_coco_official_per_caption_and_per_image(tmp_path):
    path = write_json(tmp_path / "captions_val2014.json", COCO)
    per_caption = read_coco_captions(path, image_root="/coco/val2014")
    assert [s.id for s in per_caption] == ["1", "3", "2"]  # image order, then annotation order
    first = per_caption[0]
    assert [(t.role, t.content) for t in first.turns] == [
        ("user", "<image>\nDescribe the image briefly."),
        ("assistant", "A dog runs."),
    ]
    assert first.images == ["/coco/val2014/COCO_val2014_000000000042.jpg"]
    assert first.meta["image_id"] == 42 and first.meta["source"] == f"{path}#0"

    per_image = read_coco_captions(path, per="image", prompt="Caption:")
    assert [s.meta["image_id"] for s in per_image] == [42, 7]
    assert per_image[0].meta["references"] == ["A dog runs.", "A brown dog."]
    assert per_image[0].turns[0].content == "<image>\nCaption:"
    assert per_image[0].turns[1].content == "A dog runs."


def test_coco_karpathy_with_split_filter(tmp_path):
    path = write_json(tmp_path / "dataset_coco.json", KARPATHY)
    all_captions = read_coco_captions(path, image_root="/coco")
    assert [s.turns[1].content for s in all_captions] == [
        "A man rides.",
        "A biker.",
        "Two birds.",
        "A bus.",
    ]
    assert all_captions[0].id == "10" and all_captions[2].id == "1_0"
    assert all_captions[0].images == ["/coco/val2014/a.jpg"]

    test = read_coco_captions(path, per="image", split="test")
    assert len(test) == 1 and test[0].meta["image_id"] == 391895  # cocoid preferred
    assert test[0].meta["references"] == ["A man rides.", "A biker."]

    train = read_coco_captions(path, per="image", split=["train", "restval"])
    assert [s.meta["image_id"] for s in train] == [1, 5]  # imgid when there is no cocoid


def test_coco_errors(tmp_path):
    coco = write_json(tmp_path / "captions.json", COCO)
    with pytest.raises(ValueError, match="no splits"):
        read_coco_captions(coco, split="train")
    with pytest.raises(ValueError, match="per must be"):
        read_coco_captions(coco, per="sentence")
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        read_coco_captions(coco, split="dev")

    neither = write_json(tmp_path / "neither.json", {"images": [{"id": 1}], "categories": []})
    with pytest.raises(DataFormatError) as info:
        read_coco_captions(neither)
    assert "neither.json" in str(info.value) and "['categories', 'images']" in str(info.value)

    bad = dict(COCO, annotations=COCO["annotations"] + [{"id": 9, "image_id": 99, "caption": "x"}])
    path = write_json(tmp_path / "dangling.json", bad)
    with pytest.raises(
        DataFormatError, match=r"dangling\.json#3: field 'annotations\[3\]\.image_id'"
    ):
        read_coco_captions(path)

    bad = {"images": [KARPATHY["images"][0], {"filename": "x.jpg", "sentences": []}]}
    path = write_json(tmp_path / "karpathy.json", bad)
    with pytest.raises(
        DataFormatError, match=r"karpathy\.json#1: missing field 'images\[1\]\.imgid"
    ):
        read_coco_captions(path)


# ------------------------------------------------------------------------------------------
# VQAv2

QUESTIONS = {
    "info": {},
    "task_type": "Open-Ended",
    "data_type": "mscoco",
    "data_subtype": "val2014",
    "questions": [
        {"image_id": 42, "question": "What color?", "question_id": 42000},
        {"image_id": 7, "question": "Is it a cat?", "question_id": 7001},
    ],
}


def answers(*strings):
    return [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(strings)
    ]


ANNOTATIONS = {
    "annotations": [
        {
            "question_id": 7001,
            "image_id": 7,
            "answers": answers(*["yes"] * 9, "no"),
            "multiple_choice_answer": "yes",
            "answer_type": "yes/no",
            "question_type": "is it a",
        },
        {
            "question_id": 42000,
            "image_id": 42,
            "answers": answers(*["red"] * 10),
            "multiple_choice_answer": "red",
            "answer_type": "other",
            "question_type": "what color",
        },
    ]
}


def test_vqav2_with_annotations(tmp_path):
    q = write_json(tmp_path / "q.json", QUESTIONS)
    a = write_json(tmp_path / "a.json", ANNOTATIONS)
    first, second = read_vqav2(q, a, image_root="/coco/val2014")
    assert first.id == "42000"
    assert first.images == ["/coco/val2014/COCO_val2014_000000000042.jpg"]
    assert first.turns[0].content == (
        "<image>\nWhat color?\nAnswer the question using a single word or phrase."
    )
    assert first.turns[1].content == "red"
    assert first.meta["answers"] == ["red"] * 10 and first.meta["answer_type"] == "other"
    assert first.meta["question_id"] == 42000 and first.meta["image_id"] == 42
    assert second.meta["answers"][-1] == "no" and second.turns[1].content == "yes"


def test_vqav2_questions_only_is_inference_only(tmp_path):
    q = write_json(tmp_path / "q.json", QUESTIONS)
    samples = read_vqav2(q, image_pattern="{image_id}.png", prompt_suffix="")
    assert [len(s.turns) for s in samples] == [1, 1]
    assert samples[0].turns[0].content == "<image>\nWhat color?"
    assert samples[0].images == ["42.png"] and "answers" not in samples[0].meta


def test_vqav2_answer_types_keeps_only_those_types(tmp_path):
    q = write_json(tmp_path / "q.json", QUESTIONS)
    a = write_json(tmp_path / "a.json", ANNOTATIONS)
    (only,) = read_vqav2(q, a, answer_types=["yes/no"])
    assert only.id == "7001" and only.meta["answer_type"] == "yes/no"
    assert [s.id for s in read_vqav2(q, a, answer_types=["other", "yes/no"])] == ["42000", "7001"]
    with pytest.raises(DataFormatError, match=r"a\.json: no question has answer_type in \['number'\]"):
        read_vqav2(q, a, answer_types=["number"])
    with pytest.raises(ValueError, match="answer_types: filtering by answer type needs annotations_path"):
        read_vqav2(q, answer_types=["yes/no"])
    with pytest.raises(ValueError, match="answer_types: a list"):
        read_vqav2(q, a, answer_types="yes/no")


def test_vqav2_only_answers_keeps_only_those_answers(tmp_path):
    q = write_json(tmp_path / "q.json", QUESTIONS)
    a = write_json(tmp_path / "a.json", ANNOTATIONS)
    everything = read_vqav2(q, a)
    first = everything[0].turns[-1].content
    kept = read_vqav2(q, a, only_answers=[first])
    assert kept and all(s.turns[-1].content == first for s in kept)
    assert len(kept) == sum(s.turns[-1].content == first for s in everything) < len(everything)
    with pytest.raises(DataFormatError, match=r"a\.json: no question has multiple_choice_answer in \['nothing'\]"):
        read_vqav2(q, a, only_answers=["nothing"])
    with pytest.raises(ValueError, match="only_answers: filtering by answer needs annotations_path"):
        read_vqav2(q, only_answers=["yes"])
    with pytest.raises(ValueError, match="only_answers: a list, got the string 'yes'"):
        read_vqav2(q, a, only_answers="yes")


def test_vqav2_errors(tmp_path):
    q = write_json(tmp_path / "q.json", QUESTIONS)
    extra = {
        "annotations": ANNOTATIONS["annotations"]
        + [dict(ANNOTATIONS["annotations"][0], question_id=555)]
    }
    a = write_json(tmp_path / "a.json", extra)
    with pytest.raises(DataFormatError) as info:
        read_vqav2(q, a)
    assert "question_id 555" in str(info.value) and q in str(info.value) and a in str(info.value)

    a = write_json(tmp_path / "a1.json", {"annotations": ANNOTATIONS["annotations"][:1]})
    with pytest.raises(DataFormatError) as info:
        read_vqav2(q, a)
    assert "question_id 42000" in str(info.value) and "a1.json" in str(info.value)

    no_subtype = write_json(tmp_path / "q2.json", {"questions": QUESTIONS["questions"]})
    with pytest.raises(DataFormatError, match=r"q2\.json: image_pattern .* needs \{subset\}"):
        read_vqav2(no_subtype)
    assert len(read_vqav2(no_subtype, image_pattern="{image_id}.jpg")) == 2

    bad = dict(QUESTIONS, questions=QUESTIONS["questions"] + [{"image_id": 1, "question_id": 3}])
    path = write_json(tmp_path / "q3.json", bad)
    with pytest.raises(
        DataFormatError, match=r"q3\.json#2: missing field 'questions\[2\]\.question'"
    ):
        read_vqav2(path)


# ------------------------------------------------------------------------------------------
# registry


def test_registry_and_read_dataset(tmp_path):
    assert READERS.names() == ["coco_captions", "hf_dataset", "jsonl", "llava_json", "pope", "preference_json", "vqav2",
                              "webdataset"]
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n")
    (sample,) = read_dataset("jsonl", path=str(path))
    assert sample.turns[0].content == "hello"
    with pytest.raises(KeyError, match="did you mean 'llava_json'"):
        read_dataset("llava-json", path=str(path))


def test_read_samples_applies_max_samples_then_repeat_per_dataset(tmp_path):
    from omegaconf import OmegaConf

    from vlm.config import DataConfig
    from vlm.data.formats import read_samples

    args = {"questions_path": write_json(tmp_path / "q.json", QUESTIONS),
            "annotations_path": write_json(tmp_path / "a.json", ANNOTATIONS)}
    mix = [OmegaConf.structured(DataConfig(format="vqav2", args=args, max_samples=1, repeat=3)),
           OmegaConf.structured(DataConfig(format="vqav2", args=args))]
    assert [s.id for s in read_samples(mix)] == ["42000"] * 3 + ["42000", "7001"]
