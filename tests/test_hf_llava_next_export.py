"""`vlm export hf-llava-next`: the folder used as transformers users use it (AutoProcessor, its
chat template, generate) gives exactly `vlm chat`'s answer; what LLaVA-NeXT cannot hold is one line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, run_vlm, write_images
from PIL import Image
from test_anyres import tiled_config
from test_hf_llava_interop import write_stage_output
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.types import Sample, Turn
from vlm.inference.chat import answer
from vlm.inference.generation import stop_settings
from vlm.modeling.processing import build_processor

QUESTION = "what color is the shape?"


def stop_early(model, processor, image, max_new_tokens=12):
    """Make greedy decoding end on the template's stop token after a few tokens: its lm_head row
    becomes a multiple of a token greedy decoding picks later (as tests/test_hf_llava_export.py)."""
    settings = stop_settings(processor)
    stop = [t for t in settings["eos_token_id"] if t != processor.tokenizer.eos_token_id][0]
    encoded = processor.encode(Sample(id="s", turns=[Turn("user", f"<image>\n{QUESTION}")], images=[image]),
                               for_generation=True)
    ids = torch.tensor([encoded.input_ids])
    inputs = dict(attention_mask=torch.ones_like(ids), pixel_values=encoded.images[0],
                  image_layouts=torch.tensor([encoded.image_layouts[0].as_row()]))
    free = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          **inputs)
    head = model.llm.get_output_embeddings().weight
    for position in range(2, max_new_tokens):
        for factor in (1.1, 1.5, 2.0, 3.0):
            with torch.no_grad():
                head[stop] = factor * head[int(free[0, position])]
            new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **settings, **inputs)[0]
            if len(new) >= 3 and int(new[-1]) == stop and stop not in new[:-1].tolist():
                return stop
    raise AssertionError("could not make the tiny model stop early")


@pytest.mark.parametrize("size", [(100, 37), (30, 75)])  # wide (1 x 3 grid), tall (2 x 1): both unpad directions
def test_auto_processor_and_generate_give_vlm_chats_answer(tmp_path, tokenizer_dir, tokenizer, size, capsys):
    cfg = tiled_config(tokenizer_dir)
    cfg.image_placement = "first"  # as a single-image training records it
    ours = build_tiny_model(cfg, tokenizer, seed=7)
    image = write_images(tmp_path / "img", sizes=[size])[0]
    stop = stop_early(ours, build_processor(ours, tokenizer, cfg), image)
    stage_out = write_stage_output(tmp_path / "instruct" / "final", ours, cfg, tokenizer)

    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    processor = build_processor(model, tok, model_cfg)
    expected = answer(model, processor, image, [Turn("user", f"<image>\n{QUESTION}")])

    code, out, _ = run_vlm(["export", "hf-llava-next", str(stage_out), "--out", str(tmp_path / "hf")], capsys)
    assert code == 0 and "exported:" in out
    hf_dir = tmp_path / "hf"
    info = json.loads((hf_dir / "vlm_export.json").read_text())
    assert info["tiling"]["grid_pinpoints"] == [list(p) for p in model.tiling.pinpoints]
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir), backend="pil")
    next_model = LlavaNextForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    text_first = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    assert hf_processor.apply_chat_template(text_first, add_generation_prompt=True) == text  # the model's placement
    with Image.open(image) as img:
        inputs = hf_processor(images=img, text=text, return_tensors="pt")
    ours_ids = processor.encode(Sample(id="s", turns=[Turn("user", f"<image>\n{QUESTION}")], images=[image]),
                                for_generation=True).input_ids
    assert inputs["input_ids"][0].tolist() == ours_ids  # the same prompt, the same visual-token count
    with torch.no_grad():
        new = next_model.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
    assert int(new[-1]) == stop and len(new) < 64, "generation ends on the template's stop id"
    got = hf_processor.decode(new, skip_special_tokens=True).strip()
    assert got == expected and got


def test_a_layout_llava_next_cannot_hold_is_refused_with_one_line(tmp_path, tokenizer_dir, tokenizer, capsys):
    cfg = tiled_config(tokenizer_dir, pool_stride=2)
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    code, _, err = run_vlm(["export", "hf-llava-next", str(stage_out), "--out", str(tmp_path / "hf")], capsys)
    assert code != 0
    line = [ln for ln in err.strip().splitlines() if "pool_stride" in ln]
    assert len(line) == 1 and "LLaVA-NeXT pools no tile" in line[0]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
