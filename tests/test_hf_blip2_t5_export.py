"""`vlm export hf-blip2` of a T5 model: transformers' BLIP-2 / InstructBLIP with a
T5ForConditionalGeneration, giving vlm's greedy tokens from the same prompt (eos appended, as
T5's encoder reads it)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, write_images
from PIL import Image
from test_hf_blip2_export import QFORMER, blip2_config
from test_hf_llava_export import QUESTION
from test_hf_llava_interop import write_stage_output
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    T5ForConditionalGeneration,
)

from vlm.checkpoint.pretrained import load_pretrained
from vlm.data.types import Turn
from vlm.interop.hf_blip2 import export_hf_blip2
from vlm.modeling.processing import build_processor
from vlm.modeling.seq2seq_vlm import Seq2SeqVisionLanguageModel

T5_ARCH = dict(model_type="t5", d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0)


@pytest.mark.parametrize("instruction_aware", [False, True])
def test_exported_t5_blip2_gives_vlms_greedy_tokens(tmp_path, tokenizer_dir, tokenizer, instruction_aware):
    cfg = blip2_config(tokenizer_dir, template="blip2_qa",
                       **{"llm.arch": dict(T5_ARCH), "llm.kind": "seq2seq",
                          "connector.options": {**QFORMER, "instruction_aware": instruction_aware, "dropout": 0.0}})
    ours = build_tiny_model(cfg, tokenizer, seed=4)
    with torch.no_grad():  # wide enough that greedy decoding writes varied tokens
        for param in ours.llm.parameters():
            if param.dim() == 2:
                param.normal_(std=0.2)
    stage_out = write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer)
    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    assert isinstance(model, Seq2SeqVisionLanguageModel)
    processor = build_processor(model, tok, model_cfg)
    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    ids, _ = processor.tokenize([Turn("user", f"<image>\n{QUESTION}")], add_generation_prompt=True)
    pixels = processor.load_image(image)[None]
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    expected = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                              instructions=[QUESTION], **kwargs)
    assert len(set(expected[0].tolist())) > 2

    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir)).eval()
    assert type(hf).__name__ == ("InstructBlip" if instruction_aware else "Blip2") + "ForConditionalGeneration"
    assert isinstance(hf.language_model, T5ForConditionalGeneration)
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    chat_ids = AutoTokenizer.from_pretrained(str(hf_dir)).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids == ids  # the exported chat template writes vlm's blip2_qa prompt
    encoder_ids = torch.tensor([ids + [tok.eos_token_id]])  # T5's encoder input ends with eos
    extra = {}
    if instruction_aware:
        q = hf_processor.qformer_tokenizer([QUESTION], return_tensors="pt", truncation=True)
        extra = dict(qformer_input_ids=q["input_ids"], qformer_attention_mask=q["attention_mask"])
    with Image.open(image) as img:
        hf_pixels = hf_processor.image_processor(img, return_tensors="pt").pixel_values
    torch.testing.assert_close(hf_pixels, pixels, atol=0.02, rtol=0)  # the saved image processor (resampling aside)
    with torch.no_grad():
        got = hf.generate(input_ids=encoder_ids, attention_mask=torch.ones_like(encoder_ids), pixel_values=pixels,
                          **kwargs, **extra)[:, 1:]  # the decoder's start token left out
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("family", ["causal", "seq2seq"])
def test_import_of_an_exported_blip2_folder_gives_the_same_greedy_tokens(tmp_path, tokenizer_dir, tokenizer, family,
                                                                         capsys):
    from conftest import run_vlm

    overrides = {"llm.arch": dict(T5_ARCH), "llm.kind": "seq2seq"} if family == "seq2seq" else {}
    cfg = blip2_config(tokenizer_dir, template="blip2_qa", **overrides)
    ours = build_tiny_model(cfg, tokenizer, seed=4)
    with torch.no_grad():
        for param in ours.llm.parameters():
            if param.dim() == 2:
                param.normal_(std=0.2)
    stage_out = write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer)
    hf_dir = export_hf_blip2(stage_out, tmp_path / "hf")
    imported = tmp_path / "imported"
    code, out, err = run_vlm(["import", "hf-blip2", hf_dir, "--out", imported], capsys)
    assert code == 0 and f"imported: {imported}" in out, err[-2000:]

    image = write_images(tmp_path / "img", sizes=[(40, 40)])[0]
    tokens = []
    for folder in (stage_out, imported):
        model, tok, model_cfg = load_pretrained(folder, device="cpu")
        processor = build_processor(model, tok, model_cfg)
        ids, _ = processor.tokenize([Turn("user", f"<image>\n{QUESTION}")], add_generation_prompt=True)
        tokens.append(model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                     processor.load_image(image)[None], max_new_tokens=8, do_sample=False,
                                     eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id).tolist())
        assert model.is_encoder_decoder == (family == "seq2seq")
    assert tokens[0] == tokens[1] and len(set(tokens[0][0])) > 1


def test_import_refuses_a_folder_that_is_not_blip2(tmp_path, tokenizer_dir, tokenizer, capsys):
    from conftest import run_vlm, tiny_model_config

    from vlm.interop.hf_llava import export_hf_llava

    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    hf_dir = export_hf_llava(stage_out, tmp_path / "hf")
    code, _, err = run_vlm(["import", "hf-blip2", hf_dir, "--out", tmp_path / "imported"], capsys)
    assert code == 2 and "model_type is 'llava'" in err and not (tmp_path / "imported").exists()
