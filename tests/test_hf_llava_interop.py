"""Export to and import from transformers' LlavaForConditionalGeneration: the same numbers both
ways, through memory and through folders on disk."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, tiny_model_config
from PIL import Image
from transformers import LlavaForConditionalGeneration

from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import COMPONENTS, Train
from vlm.interop.hf_llava import (
    EXPORT_INFO,
    LlavaLayoutError,
    export_hf_llava,
    from_hf_llava,
    import_hf_llava,
    to_hf_llava,
)
from vlm.modeling.processing import build_processor
from vlm.modeling.vlm import VisionLanguageModel


def prompts(model, tokenizer):
    """Two left-padded prompts with one image each, and their pixels."""
    k, image = model.num_image_tokens, model.image_token_id
    rows = [tokenizer("describe the").input_ids + [image] * k + tokenizer("what color").input_ids,
            [image] * k + tokenizer("shape").input_ids]
    longest = max(map(len, rows))
    ids = torch.full((2, longest), tokenizer.pad_token_id)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = torch.tensor(row)
        mask[i, longest - len(row):] = 1
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return ids, mask, pixels


def assert_same_outputs(ours, llava, tokenizer):
    ids, mask, pixels = prompts(ours, tokenizer)
    with torch.no_grad():
        expected = ours(ids, attention_mask=mask, pixel_values=pixels).logits
        got = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kwargs)[:, ids.shape[1]:]
    assert torch.equal(ours.generate(ids, attention_mask=mask, pixel_values=pixels, **kwargs), theirs)


@pytest.mark.parametrize("overrides", [{}, {"vision.keep_cls": True, "vision.feature_layer": -1},
                                       {"connector.options": {"bias": False}, "llm.arch.tie_word_embeddings": True}])
def test_exported_llava_gives_our_logits_and_greedy_tokens(tokenizer_dir, tokenizer, overrides):
    cfg = tiny_model_config(tokenizer_dir, **overrides)
    ours = build_tiny_model(cfg, tokenizer)
    llava = to_hf_llava(ours)
    kept = len(ours.vision.model.encoder.layers)
    assert llava.config.vision_config.num_hidden_layers == kept and llava.config.vision_feature_layer == -1
    assert llava.config.vision_feature_select_strategy == ("full" if cfg.vision.keep_cls else "default")
    assert_same_outputs(ours, llava, tokenizer)


def test_import_of_a_transformers_llava_gives_its_logits(tokenizer_dir, tokenizer):
    """A randomly initialised transformers LLaVA reading layer -2 of a 3-block tower."""
    exported = to_hf_llava(build_tiny_model(tiny_model_config(tokenizer_dir, **{"vision.feature_layer": -1}),
                                            tokenizer))
    config = exported.config
    config.vision_config.num_hidden_layers = 3
    config.vision_feature_layer = -2
    torch.manual_seed(3)
    llava = LlavaForConditionalGeneration(config).eval()
    ours = from_hf_llava(llava)
    assert len(ours.vision.model.encoder.layers) == 2 and ours.num_image_tokens == 16
    assert_same_outputs(ours, llava, tokenizer)


def test_layouts_transformers_llava_cannot_hold_are_refused(tokenizer_dir, tokenizer):
    pooled = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.options": {"pool": 2}}), tokenizer)
    with pytest.raises(LlavaLayoutError, match=r"^model\.connector: .* with pool=2"):
        to_hf_llava(pooled)
    summary = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.options": {"global_token": True}}),
                               tokenizer)
    with pytest.raises(LlavaLayoutError, match=r"^model\.connector: .* with global_token"):
        to_hf_llava(summary)
    placed = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.options": {"position_embedding": True}}),
                              tokenizer)
    with pytest.raises(LlavaLayoutError, match=r"^model\.connector: .* with position_embedding"):
        to_hf_llava(placed)
    linear = build_tiny_model(tiny_model_config(tokenizer_dir, **{"connector.name": "linear"}), tokenizer)
    with pytest.raises(LlavaLayoutError, match=r"^model\.connector: .*LinearProjector"):
        to_hf_llava(linear)
    llava = to_hf_llava(build_tiny_model(tiny_model_config(tokenizer_dir), tokenizer))
    llava.config.vision_feature_layer = [-2, -1]
    with pytest.raises(LlavaLayoutError, match="several layers"):
        from_hf_llava(llava)


def write_stage_output(folder, model, cfg, tokenizer):
    """``model`` as a stage output that trained everything (what ``vlm train`` writes)."""
    folder.mkdir(parents=True)
    everything = {comp: Train.full for comp in COMPONENTS}
    save_model_state(model, folder, everything, cfg, tokenizer, prior=None)
    return folder


def test_export_then_import_through_folders_keeps_every_number(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    ours = build_tiny_model(cfg, tokenizer, seed=5)
    stage_out = write_stage_output(tmp_path / "instruct" / "final", ours, cfg, tokenizer)

    hf_dir = export_hf_llava(stage_out, tmp_path / "hf")
    info = json.loads((hf_dir / EXPORT_INFO).read_text())
    assert info["template"] == "chatml" and info["num_image_tokens"] == 16 and info["image_processor"]
    assert not list(tmp_path.glob(".hf.tmp-*"))
    llava = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    assert_same_outputs(ours, llava, tokenizer)

    # the saved image processor is vlm's 'resize' preprocessing
    from transformers import CLIPImageProcessor

    image = Image.new("RGB", (50, 30), (200, 40, 10))
    expected = ours.vision.image_transform()(image)
    got = CLIPImageProcessor.from_pretrained(str(hf_dir))(image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)  # PIL's vs torchvision's bicubic

    imported = import_hf_llava(hf_dir, tmp_path / "imported", template="chatml", preprocess="resize")
    model, tok, model_cfg = load_pretrained(imported, device="cpu")
    assert model_cfg.template == "chatml" and model_cfg.vision.pretrained == str((imported / "vision").resolve())
    assert isinstance(model, VisionLanguageModel)
    assert_same_outputs(model, llava, tok)
    processor = build_processor(model, tok, model_cfg)
    assert processor is not None


def test_import_refuses_a_tokenizer_whose_image_token_disagrees(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir)
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    hf_dir = export_hf_llava(stage_out, tmp_path / "hf")
    with pytest.raises(LlavaLayoutError, match=r"the tokenizer gives '<s>' id \d+, but the model's image_token_id"):
        import_hf_llava(hf_dir, tmp_path / "imported", image_token="<s>")
    assert not (tmp_path / "imported").exists()


def test_cli_export_and_import(tmp_path, tokenizer_dir, tokenizer, capsys):
    from vlm.app.cli import main

    cfg = tiny_model_config(tokenizer_dir)
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    main(["export", "hf-llava", str(stage_out), "--out", str(tmp_path / "hf")])
    main(["import", "hf-llava", str(tmp_path / "hf"), "--out", str(tmp_path / "back"), "--preprocess", "resize"])
    out = capsys.readouterr().out
    assert "exported:" in out and "imported:" in out and (tmp_path / "back" / "manifest.json").is_file()
    with pytest.raises(SystemExit) as info:
        main(["import", "hf-llava", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--template", "vicuna"])
    assert info.value.code == 2
    assert "--template:" in capsys.readouterr().err
