"""`vlm export hf-blip2`: a Q-Former model as transformers' Blip2ForConditionalGeneration with its
Blip2Processor, giving exactly `vlm chat`'s answer; layouts it cannot hold are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, tiny_model_config, write_images
from PIL import Image
from test_hf_llava_export import QUESTION, stop_early
from test_hf_llava_interop import write_stage_output
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
)

from vlm.checkpoint.pretrained import load_pretrained
from vlm.core.errors import LayoutError
from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.interop.hf_blip2 import export_hf_blip2, to_hf_blip2
from vlm.modeling.processing import build_processor

BLIP2_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8)
QFORMER = {"num_queries": 6, "num_layers": 3, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
           "embed_dim": 16, "cross_attention_freq": 2, "vision_layernorm": False}


def blip2_config(tokenizer_dir, **overrides):
    return tiny_model_config(tokenizer_dir, **{"vision.name": "hf_blip2_vision", "vision.arch": dict(BLIP2_VISION),
                                               "vision.keep_cls": True, "vision.feature_layer": -1,
                                               "connector.name": "qformer", "connector.options": dict(QFORMER),
                                               **overrides})


def _saved_with_answer(tmp_path, ours, cfg, tokenizer):
    """``(image, stop, stage_out, expected)``: an image, the token that stops ``ours`` early on it,
    ``ours`` written as a stage output, and vlm chat's answer from the reloaded stage."""
    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    stop = stop_early(ours, build_processor(ours, tokenizer, cfg), image)
    stage_out = write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer)
    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    expected = answer(model, build_processor(model, tok, model_cfg), image, [Turn("user", f"<image>\n{QUESTION}")])
    return image, stop, stage_out, expected


@pytest.mark.parametrize("template,norm", [("vicuna_v1", "encoder"), ("chatml", "qformer")])
def test_exported_blip2_gives_vlm_chats_answer(tmp_path, tokenizer_dir, tokenizer, template, norm):
    overrides = {"template": template}
    if norm == "qformer":  # ln_vision in the Q-Former, none in the encoder
        overrides.update({"vision.options": {"post_layernorm": False},  # and the same LayerNorm eps
                          "vision.arch": {**BLIP2_VISION, "layer_norm_eps": 1e-5},
                          "connector.options": {**QFORMER, "vision_layernorm": True}})
    cfg = blip2_config(tokenizer_dir, **overrides)
    ours = build_tiny_model(cfg, tokenizer, seed=3)
    if norm == "qformer":
        with torch.no_grad():  # a trained-looking ln_vision, so that mapping it matters
            ours.connector.vision_norm.weight.uniform_(0.5, 1.5)
            ours.connector.vision_norm.bias.uniform_(-0.2, 0.2)
    processor = build_processor(ours, tokenizer, cfg)
    image, stop, stage_out, expected = _saved_with_answer(tmp_path, ours, cfg, tokenizer)

    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    assert isinstance(hf_processor, Blip2Processor) and hf_processor.num_query_tokens == 6
    hf = Blip2ForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    assert hf.config.image_token_id == ours.image_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    hf_tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = torch.tensor([ids["input_ids"]])
    vlm_ids, _ = processor.tokenize([Turn("user", f"<image>\n{QUESTION}")], add_generation_prompt=True)
    assert ids[0].tolist() == vlm_ids
    with Image.open(image) as img:
        pixels = hf_processor.image_processor(img, return_tensors="pt").pixel_values
        # the processor's own layout: the queries' placeholders first, then the text
        inputs = hf_processor(images=img, text="describe the image", return_tensors="pt")
    assert inputs["input_ids"][0, :6].tolist() == [ours.image_token_id] * 6
    with torch.no_grad():
        hf.generate(**inputs, max_new_tokens=3)
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)[0, ids.shape[1]:]
    assert int(out[-1]) == stop and len(out) < 64
    got = hf_processor.decode(out, skip_special_tokens=True).strip()
    assert got == expected and got


def test_blip2_export_refuses_what_transformers_cannot_hold(tmp_path, tokenizer_dir, tokenizer, capsys):
    both = build_tiny_model(blip2_config(tokenizer_dir, **{"connector.options": {**QFORMER,
                                                                                 "vision_layernorm": True}}), tokenizer)
    with pytest.raises(LayoutError, match="not both"):
        to_hf_blip2(both)
    positions = build_tiny_model(blip2_config(tokenizer_dir, **{"connector.options": {**QFORMER,
                                                                                      "image_positions": 17}}),
                                 tokenizer)
    with pytest.raises(LayoutError, match="image_positions"):
        to_hf_blip2(positions)
    llava = build_tiny_model(tiny_model_config(tokenizer_dir), tokenizer)
    with pytest.raises(LayoutError, match="Q-Former"):
        to_hf_blip2(llava)


def test_cli_refuses_beit3_query_with_exit_2_pointing_to_serve(tmp_path, tokenizer_dir, tokenizer, capsys):
    from test_beit3_query import BEIT3_ARCH

    from vlm.app.cli import main

    cfg = tiny_model_config(tokenizer_dir, **{"vision.name": "beit3", "vision.arch": dict(BEIT3_ARCH),
                                              "vision.feature_layer": -1, "connector.name": "beit3_query",
                                              "connector.options": {"num_queries": 4}})
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    with pytest.raises(SystemExit) as info:
        main(["export", "hf-blip2", str(stage_out), "--out", str(tmp_path / "hf")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "beit3_query" in err and "vlm serve" in err
    assert not (tmp_path / "hf").exists()


def test_instruction_aware_qformer_exports_as_instructblip(tmp_path, tokenizer_dir, tokenizer):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    cfg = blip2_config(tokenizer_dir, template="chatml",
                       **{"connector.options": {**QFORMER, "instruction_aware": True, "dropout": 0.0}})
    ours = build_tiny_model(cfg, tokenizer, seed=8)
    image, stop, stage_out, expected = _saved_with_answer(tmp_path, ours, cfg, tokenizer)

    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    assert isinstance(hf_processor, InstructBlipProcessor)
    hf = InstructBlipForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    ids = AutoTokenizer.from_pretrained(str(hf_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([ids])
    # vlm's instruction for the Q-Former is the question, tokenised as vlm does
    q = hf_processor.qformer_tokenizer([QUESTION], return_tensors="pt", truncation=True)
    vlm_q, _ = ours.connector.tokenize_texts([QUESTION])
    assert q["input_ids"].tolist() == vlm_q.tolist()
    with Image.open(image) as img:
        pixels = hf_processor.image_processor(img, return_tensors="pt").pixel_values
    with torch.no_grad():
        out = hf.generate(pixel_values=pixels, qformer_input_ids=q["input_ids"],
                          qformer_attention_mask=q["attention_mask"], input_ids=ids,
                          attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    assert int(out[-1]) == stop and len(out) < 64
    got = hf_processor.decode(out, skip_special_tokens=True).strip()
    assert got == expected and got
