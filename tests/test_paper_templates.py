"""The BLIP-2 / InstructBLIP prompt templates: the papers' text, labels on the answer and eos only."""

from __future__ import annotations

from vlm.data.templates import build_template
from vlm.data.types import Turn
from vlm.modeling.processing import build_processor


def test_blip2_qa_writes_the_zero_shot_vqa_prompt_and_trains_the_answer_only(tokenizer):
    template = build_template("blip2_qa", tokenizer)
    turns = [Turn("user", "<image>\nwhat color is it?"), Turn("assistant", "red")]
    segments = template.segments(turns)
    eos = tokenizer.eos_token
    assert [(s.text, s.trainable) for s in segments] == [
        ("<image>Question: what color is it? Short answer:", False), (f" red{eos}", True)]
    prompt = template.segments(turns[:1], add_generation_prompt=True)
    assert [s.text for s in prompt] == ["<image>Question: what color is it? Short answer:"]
    # a caption (no text besides the image) gets the image alone under BLIP-2's prompt...
    caption = [Turn("user", "<image>\n"), Turn("assistant", "a red circle")]
    assert template.segments(caption)[0].text == "<image>"
    # ...and InstructBLIP's captioning instruction under its own
    assert build_template("instructblip", tokenizer).segments(caption)[0].text == "<image>A short image description:"


def test_the_processor_labels_exactly_the_answer_and_eos(model_config, tiny_model, tokenizer):
    processor = build_processor(tiny_model, tokenizer, model_config, "blip2_qa")
    ids, labels = processor.tokenize([Turn("user", "<image>\nwhat shape is it?"), Turn("assistant", "a circle")])
    trained = [t for t in labels if t != -100]
    assert trained == tokenizer(" a circle", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(trained):] == trained and ids[0] != tokenizer.bos_token_id
    prompt = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100 and t != tiny_model.image_token_id])
    assert prompt == "Question: what shape is it? Short answer:"
