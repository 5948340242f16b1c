"""An exported LLaVA folder used as transformers users use it: AutoProcessor's chat template,
processor and the folder's generation config give exactly `vlm chat`'s answer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, tiny_model_config, write_images
from PIL import Image
from safetensors import safe_open
from test_hf_llava_interop import write_stage_output
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from vlm.checkpoint.pretrained import load_pretrained
from vlm.core.errors import ConfigError
from vlm.data.templates import build_template
from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.inference.generation import stop_settings
from vlm.interop.chat_template import jinja_chat_template
from vlm.interop.hf_llava import export_hf_llava
from vlm.modeling.processing import build_processor

QUESTION = "what color is the shape?"


def stop_early(model, processor, image, max_new_tokens=12):
    """Make greedy decoding end on the template's stop token after a few tokens (not at
    max_new_tokens): its lm_head row becomes a multiple of a token greedy decoding picks later.
    Returns the stop id."""
    settings = stop_settings(processor)
    stop = [t for t in settings["eos_token_id"] if t != processor.tokenizer.eos_token_id]
    stop = stop[0] if stop else processor.tokenizer.eos_token_id
    ids, _ = processor.tokenize([Turn("user", f"<image>\n{QUESTION}")], add_generation_prompt=True)
    inputs = (torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), processor.load_image(image)[None],
              [QUESTION])  # the image's instruction, for a Q-Former that reads one
    free = model.generate(*inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    head = model.llm.get_output_embeddings().weight
    for position in range(2, max_new_tokens):
        for factor in (1.1, 1.5, 2.0, 3.0):
            with torch.no_grad():
                head[stop] = factor * head[int(free[0, position])]
            new = model.generate(*inputs, max_new_tokens=max_new_tokens, do_sample=False, **settings)[0]
            if len(new) >= 3 and int(new[-1]) == stop and stop not in new[:-1].tolist():
                return stop
    raise AssertionError("could not make the tiny model stop early")


@pytest.mark.parametrize("template", ["chatml", "vicuna_v1"])
@pytest.mark.parametrize("preprocess", ["resize", "pad"])
def test_auto_processor_and_generate_give_vlm_chats_answer(tmp_path, tokenizer_dir, tokenizer, template, preprocess):
    cfg = tiny_model_config(tokenizer_dir, template=template, **{"vision.preprocess": preprocess})
    ours = build_tiny_model(cfg, tokenizer, seed=7)
    image = write_images(tmp_path / "img", sizes=[(50, 30)])[0]  # wide: padding matters
    processor = build_processor(ours, tokenizer, cfg)
    stop = stop_early(ours, processor, image)
    stage_out = write_stage_output(tmp_path / "instruct" / "final", ours, cfg, tokenizer)

    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    expected = answer(model, build_processor(model, tok, model_cfg), image, [Turn("user", f"<image>\n{QUESTION}")])

    hf_dir = export_hf_llava(stage_out, tmp_path / "hf")
    hf_processor = AutoProcessor.from_pretrained(str(hf_dir))
    llava = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    with Image.open(image) as img:
        inputs = hf_processor(images=img, text=text, return_tensors="pt")
    # the same prompt ids as vlm's processor builds
    ours_ids, _ = processor.tokenize([Turn("user", f"<image>\n{QUESTION}")], add_generation_prompt=True)
    assert inputs["input_ids"][0].tolist() == ours_ids
    with torch.no_grad():
        out = llava.generate(**inputs)[0, inputs["input_ids"].shape[1]:]
    assert int(out[-1]) == stop and len(out) < 64, "generation ends on the template's stop id"
    got = hf_processor.decode(out, skip_special_tokens=True).strip()
    assert got == expected and got


@pytest.mark.parametrize("preprocess", ["resize", "pad", "resize_center_crop"])
def test_exported_image_processor_gives_vlms_pixels(tmp_path, tokenizer_dir, tokenizer, preprocess):
    cfg = tiny_model_config(tokenizer_dir, **{"vision.preprocess": preprocess})
    ours = build_tiny_model(cfg, tokenizer)
    hf_dir = export_hf_llava(write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer), tmp_path / "hf")
    with Image.open(write_images(tmp_path / "img", sizes=[(50, 30)])[0]) as img:
        img.load()
    expected = ours.vision.image_transform()(img)
    # PIL backend: the same PIL bicubic resize as vlm, so the same pixels
    pil = AutoProcessor.from_pretrained(str(hf_dir), backend="pil").image_processor
    got = torch.as_tensor(pil(img, return_tensors="pt").pixel_values[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the default (torchvision) backend resizes tensors: within one grey level
    fast = AutoProcessor.from_pretrained(str(hf_dir)).image_processor(img, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(fast, expected, atol=1.01 / 255 / min(ours.vision.std), rtol=0)


def test_export_writes_one_dtype_architectures_and_processor_config(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, template="chatml", **{"llm.dtype": "bfloat16"})
    ours = build_tiny_model(cfg, tokenizer)
    stage_out = write_stage_output(tmp_path / "s" / "final", ours, cfg, tokenizer)
    hf_dir = export_hf_llava(stage_out, tmp_path / "hf")
    config = AutoConfig.from_pretrained(str(hf_dir))
    assert config.text_config.architectures == ["LlamaForCausalLM"]
    assert config.dtype == torch.bfloat16
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((hf_dir / "preprocessor_config.json").read_text())["image_processor_type"] == "LlavaImageProcessor"
    processor_config = json.loads((hf_dir / "processor_config.json").read_text())
    assert processor_config["patch_size"] == 8 and processor_config["num_additional_image_tokens"] == 1
    assert processor_config["vision_feature_select_strategy"] == "default"
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]

    with pytest.raises(ConfigError, match="not empty"):
        export_hf_llava(stage_out, hf_dir)
    export_hf_llava(stage_out, hf_dir, dtype="float32", overwrite=True)
    assert AutoConfig.from_pretrained(str(hf_dir)).dtype == torch.float32


@pytest.mark.parametrize("name", ["plain", "vicuna_v1", "chatml", "tokenizer", "blip2_qa", "instructblip"])
@pytest.mark.parametrize("system_prompt", [None, "Answer briefly."])
def test_jinja_template_renders_vlms_text(tokenizer, name, system_prompt):
    ours = build_template(name, tokenizer, system_prompt)
    jinja = jinja_chat_template(name, tokenizer, system_prompt)
    parts = [{"type": "image"}, {"type": "text", "text": "what?"}]
    conversations = [
        ([Turn("user", "<image>\nwhat?")], [{"role": "user", "content": parts}]),
        ([Turn("user", "<image>\nwhat?"), Turn("assistant", "red"), Turn("user", "and?")],
         [{"role": "user", "content": parts}, {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
          {"role": "user", "content": "and?"}]),
        ([Turn("system", "Be kind."), Turn("user", "<image>\nwhat?"), Turn("assistant", "red")],
         [{"role": "system", "content": "Be kind."}, {"role": "user", "content": parts},
          {"role": "assistant", "content": "red"}]),
    ]
    for turns, messages in conversations:
        for generation in (True, False):
            expected = ("<s>" if ours.add_bos else "") + "".join(
                s.text for s in ours.segments(turns, add_generation_prompt=generation))
            got = tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                                add_generation_prompt=generation)
            assert got == expected


def test_import_refuses_a_non_empty_out_without_overwrite(tmp_path, tokenizer_dir, tokenizer):
    from vlm.interop.hf_llava import import_hf_llava

    cfg = tiny_model_config(tokenizer_dir)
    hf_dir = export_hf_llava(write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg,
                                                tokenizer), tmp_path / "hf")
    out = tmp_path / "imported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        import_hf_llava(hf_dir, out, preprocess="resize")
    assert (out / "notes.txt").read_text() == "mine"
    import_hf_llava(hf_dir, out, preprocess="resize", overwrite=True)
    assert (out / "manifest.json").is_file() and not (out / "notes.txt").exists()
