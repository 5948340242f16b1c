"""Golden renderings and label masks for every chat template, and what the dataset leaves out.

Expected texts are written out literally; labels are checked by decoding exactly the labelled
positions, so a template that trains on the wrong span (or on nothing) fails here.
"""

from __future__ import annotations

import logging

import pytest

from vlm.data.batch import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlm.data.processor import IGNORE_INDEX, VLMProcessor
from vlm.data.templates import VICUNA_SYSTEM, build_template
from vlm.data.types import Sample, Turn

K = 4  # placeholders per image in these tests
IMG = "<image>" * K

TURNS = [
    Turn("user", "<image>\nWhat shape is it?"),
    Turn("assistant", "A red circle."),
    Turn("user", "Where is it?"),
    Turn("assistant", "In the center."),
]

CHATML = (
    f"<|im_start|>user\n{IMG}\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\nA red circle.<|im_end|>\n"
    "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\nIn the center.<|im_end|>\n"
)
EXPECTED = {
    "plain": (f"<s>{IMG}A red circle.\nIn the center.\n", ["A red circle.\nIn the center.\n"]),
    "vicuna_v1": (
        "<s>A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. "
        f"USER: {IMG}\nWhat shape is it? ASSISTANT: A red circle.</s>USER: Where is it? ASSISTANT: In the center.</s>",
        [" A red circle.</s>", " In the center.</s>"],
    ),
    "chatml": (CHATML, ["A red circle.<|im_end|>", "In the center.<|im_end|>"]),
    "tokenizer": (CHATML, ["A red circle.<|im_end|>", "In the center.<|im_end|>"]),
}
TEMPLATE_NAMES = list(EXPECTED)


def make_processor(tokenizer, name, max_length=2048, system_prompt=None):
    transform = build_transform("resize", 32, CLIP_MEAN, CLIP_STD)
    return VLMProcessor(tokenizer, build_template(name, tokenizer, system_prompt), transform, K,
                        max_length=max_length)


def labelled_spans(ids, labels):
    """Runs of consecutive labelled positions, as token-id lists; labels must equal the ids."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token, "a label must be the token at its own position (the model shifts)"
            current.append(label)
    if current:
        spans.append(current)
    return spans


def test_vicuna_system_prompt_is_the_llava_one():
    assert VICUNA_SYSTEM in EXPECTED["vicuna_v1"][0]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_renders_the_expected_text(tokenizer, name):
    ids, labels = make_processor(tokenizer, name).tokenize(TURNS)
    assert len(ids) == len(labels)
    assert tokenizer.decode(ids) == EXPECTED[name][0]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_template_labels_exactly_the_assistant_answers(tokenizer, name):
    ids, labels = make_processor(tokenizer, name).tokenize(TURNS)
    spans = [tokenizer.decode(span) for span in labelled_spans(ids, labels)]
    assert spans == EXPECTED[name][1]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_image_placeholders_are_k_copies_and_never_labelled(tokenizer, name):
    processor = make_processor(tokenizer, name)
    ids, labels = processor.tokenize(TURNS)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == K
    assert positions == list(range(positions[0], positions[0] + K)), "one contiguous run per image"
    assert all(labels[i] == IGNORE_INDEX for i in positions)


def test_image_inside_an_assistant_answer_is_not_labelled(tokenizer):
    processor = make_processor(tokenizer, "chatml")
    turns = [Turn("user", "Draw it."), Turn("assistant", "Here: <image> done.")]
    ids, labels = processor.tokenize(turns)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == K
    assert all(label == IGNORE_INDEX for t, label in zip(ids, labels) if t == image_id)
    assert any(label != IGNORE_INDEX for label in labels)


LAST_ANSWER = {"plain": "In the center.\n", "vicuna_v1": " In the center.</s>",
               "chatml": "In the center.<|im_end|>", "tokenizer": "In the center.<|im_end|>"}


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_generation_prompt_ends_where_the_last_answer_begins(tokenizer, name):
    processor = make_processor(tokenizer, name)
    full_ids, full_labels = processor.tokenize(TURNS)
    prompt_ids, prompt_labels = processor.tokenize(TURNS[:3], add_generation_prompt=True)
    assert full_ids[: len(prompt_ids)] == prompt_ids
    rest_ids, rest_labels = full_ids[len(prompt_ids):], full_labels[len(prompt_ids):]
    assert rest_labels[0] != IGNORE_INDEX, "the first token after the prompt is the answer's first token"
    answer = [t for t, label in zip(rest_ids, rest_labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer) == LAST_ANSWER[name]


def test_generation_prompt_literals(tokenizer):
    expected = {
        "vicuna_v1": f"<s>{VICUNA_SYSTEM} USER: {IMG}\nWhat shape is it? ASSISTANT:",
        "chatml": f"<|im_start|>user\n{IMG}\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\n",
        "tokenizer": f"<|im_start|>user\n{IMG}\nWhat shape is it?<|im_end|>\n<|im_start|>assistant\n",
        "plain": f"<s>{IMG}",
    }
    sample = Sample(id="0", turns=TURNS[:2], images=["unused.png"])
    for name, text in expected.items():
        processor = make_processor(tokenizer, name)
        ids, labels = processor.tokenize(processor.prompt_turns(sample.turns), add_generation_prompt=True)
        assert tokenizer.decode(ids) == text, name
        assert all(label == IGNORE_INDEX for label in labels), name


def test_tokenizer_template_prompt_matches_apply_chat_template(tokenizer):
    processor = make_processor(tokenizer, "tokenizer")
    ids, _ = processor.tokenize(TURNS[:3], add_generation_prompt=True)
    messages = [{"role": t.role, "content": t.content.replace("<image>", IMG)} for t in TURNS[:3]]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_tokenizer_and_chatml_templates_agree_on_a_chatml_tokenizer(tokenizer):
    a = make_processor(tokenizer, "tokenizer").tokenize(TURNS)
    b = make_processor(tokenizer, "chatml").tokenize(TURNS)
    assert a == b


def test_system_turn_replaces_the_default_system_prompt(tokenizer):
    turns = [Turn("system", "Be brief.")] + TURNS[:2]
    vicuna = tokenizer.decode(make_processor(tokenizer, "vicuna_v1").tokenize(turns)[0])
    assert vicuna == f"<s>Be brief. USER: {IMG}\nWhat shape is it? ASSISTANT: A red circle.</s>"
    chatml = tokenizer.decode(make_processor(tokenizer, "chatml", system_prompt="ignored").tokenize(turns)[0])
    assert chatml.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    configured = tokenizer.decode(make_processor(tokenizer, "chatml", system_prompt="Be kind.").tokenize(TURNS[:2])[0])
    assert configured.startswith("<|im_start|>system\nBe kind.<|im_end|>\n")


# ---------------------------------------------------------------------------------------------
# ConversationDataset: what is left out, counted and logged


def sample(turns, images=(), source="data.json#0"):
    return Sample(id=source, turns=list(turns), images=list(images), meta={"source": source})


def test_sample_without_assistant_turn_is_left_out_as_fully_masked(tokenizer, image_paths, caplog):
    processor = make_processor(tokenizer, "vicuna_v1")
    good = sample(TURNS[:2], image_paths[:1], "data.json#0")
    question_only = sample([Turn("user", "<image>\nWhat is it?")], image_paths[:1], "data.json#7")
    with caplog.at_level(logging.WARNING, logger="vlm.data.dataset"):
        dataset = ConversationDataset([good, question_only], processor, name="toy", progress=False)
    assert len(dataset) == 1
    assert dataset.stats["fully_masked"] == 1 and dataset.stats["kept"] == 1
    assert dataset.left_out == {"fully_masked": ["data.json#7"]}
    assert "data.json#7" in caplog.text and "fully_masked" in caplog.text


def test_sample_whose_placeholders_do_not_fit_is_left_out_as_too_long(tokenizer, image_paths, caplog):
    fits = sample([Turn("user", "<image>"), Turn("assistant", "red")], image_paths[:1], "a.json#0")
    late_image = sample([Turn("user", "what color is the shape? what shape is it? where is it? <image>"),
                         Turn("assistant", "red")], image_paths[:1], "a.json#1")
    limit = len(make_processor(tokenizer, "chatml").tokenize(fits.turns)[0])
    processor = make_processor(tokenizer, "chatml", max_length=limit)
    late_ids = processor.tokenize(late_image.turns)[0]
    assert late_ids.index(processor.image_token_id) + K > limit
    with caplog.at_level(logging.WARNING, logger="vlm.data.dataset"):
        dataset = ConversationDataset([fits, late_image], processor, name="toy", progress=False)
    assert dataset.stats["too_long"] == 1
    assert dataset.left_out == {"too_long": ["a.json#1"]}
    assert len(dataset) == 1 and dataset.entries[0][0].id == "a.json#0"
    assert "a.json#1" in caplog.text and "too_long" in caplog.text


def test_long_text_is_truncated_and_kept_but_fully_cut_answer_is_left_out(tokenizer, image_paths):
    answer = "a small red circle in the center of the image"
    n_answer = len(tokenizer(answer + "\n", add_special_tokens=False)["input_ids"])
    assert n_answer > 2
    total = 1 + K + n_answer
    cut = make_processor(tokenizer, "plain", max_length=total - 2)
    kept = ConversationDataset([sample([Turn("user", "<image>"), Turn("assistant", answer)], image_paths[:1])],
                               cut, progress=False)
    assert kept.stats["truncated"] == 1 and len(kept) == 1
    _, ids, labels = kept.entries[0]
    assert len(ids) == len(labels) == total - 2
    no_answer = make_processor(tokenizer, "plain", max_length=1 + K)
    dropped = ConversationDataset([sample([Turn("user", "<image>"), Turn("assistant", answer)], image_paths[:1])],
                                  no_answer, progress=False)
    assert len(dropped) == 0 and dropped.stats["fully_masked"] == 1


def test_corrupt_image_is_skipped_counted_and_logged_with_its_path(tokenizer, image_paths, tmp_path, caplog):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    processor = make_processor(tokenizer, "vicuna_v1")
    dataset = ConversationDataset(
        [sample(TURNS[:2], [image_paths[0]], "ok#0"), sample(TURNS[:2], [str(broken)], "bad#1")],
        processor, progress=False)
    assert len(dataset) == 2  # images load lazily
    good = dataset[0]
    assert good is not None and good.images[0].shape == (3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="vlm.data.images"):
        assert dataset[1] is None
    assert dataset.image_failures == 1
    assert str(broken) in caplog.text and "bad#1" in caplog.text
    batch = Collator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch.input_ids.shape[0] == 1 and batch.images.shape == (1, 3, 32, 32) and batch.skipped == 1
