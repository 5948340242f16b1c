"""`vlm merge` folds LoRA into full weights (same logits); vlm's adapters load with plain PEFT on
the base they record, resized as documented."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, tiny_model_config, write_images
from omegaconf import OmegaConf
from peft import PeftModel
from test_hf_llava_interop import write_stage_output
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.manifest import read_manifest
from vlm.checkpoint.peft_sidecar import ADAPTER_INFO, init_added_rows, load_base
from vlm.checkpoint.pretrained import load_pretrained
from vlm.config import LoraConfig, Train
from vlm.core.errors import ConfigError
from vlm.data.types import Turn
from vlm.inference.chat import answer
from vlm.interop.merge import merge_checkpoint
from vlm.modeling.llm import add_lora
from vlm.modeling.processing import build_processor


def with_trained_lora(model, seed=1):
    """``model.llm`` wrapped in LoRA whose B matrices are not zero (a trained-looking adapter)."""
    model.llm = add_lora(model.llm, OmegaConf.structured(LoraConfig(r=4, alpha=8)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def lora_modes():
    """What a LoRA instruct stage trains: the connector fully, the LLM with LoRA."""
    return {"vision": Train.frozen, "connector": Train.full, "llm": Train.lora}


def inputs(model, tokenizer):
    ids = tokenizer("what color is the shape?").input_ids
    ids = torch.tensor([[model.image_token_id] * model.num_image_tokens + ids])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return ids, pixels


@pytest.fixture
def lora_output(tmp_path, tokenizer_dir, tokenizer):
    """A LoRA stage on top of a fully trained one (the LLM of the base is an earlier stage's)."""
    cfg = tiny_model_config(tokenizer_dir, template="chatml")
    first = write_stage_output(tmp_path / "align" / "final", build_tiny_model(cfg, tokenizer, seed=4), cfg, tokenizer)
    model, tok, model_cfg = load_pretrained(first, device="cpu")
    with_trained_lora(model)
    second = tmp_path / "instruct" / "final"
    second.mkdir(parents=True)
    save_model_state(model, second, lora_modes(), model_cfg, tok, prior=read_manifest(first))
    return model, tok, second


def test_merge_keeps_logits_and_writes_full_weights(tmp_path, lora_output):
    live, tokenizer, stage_out = lora_output
    ids, pixels = inputs(live, tokenizer)
    with torch.no_grad():
        expected = live(ids, pixel_values=pixels).logits  # adapters live, not merged
    merged = merge_checkpoint(stage_out, tmp_path / "merged")
    manifest = json.loads((merged / "manifest.json").read_text())
    assert [{k: v for k, v in e.items() if k != "sha256"} for e in manifest["llm"]] == [{"weights": "llm.safetensors"}]
    assert not any("adapter" in e for entries in manifest.values() for e in entries)
    model, tok, cfg = load_pretrained(merged, device="cpu")
    assert type(model.llm).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # vlm chat answers the same, and export reads it
    image = write_images(tmp_path / "img", sizes=[(32, 32)])[0]
    turns = [Turn("user", "<image>\nwhat?")]
    before, btok, bcfg = load_pretrained(stage_out, device="cpu")
    assert answer(model, build_processor(model, tok, cfg), image, turns) == \
        answer(before, build_processor(before, btok, bcfg), image, turns)
    from vlm.interop.hf_llava import export_hf_llava

    assert (export_hf_llava(merged, tmp_path / "hf") / "config.json").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        merge_checkpoint(stage_out, merged)
    merge_checkpoint(stage_out, merged, overwrite=True)


def test_adapter_on_an_earlier_stages_llm_loads_with_plain_peft(lora_output):
    live, tokenizer, stage_out = lora_output
    adapter = stage_out / "llm_adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "../llm_base"
    info = json.loads((adapter / ADAPTER_INFO).read_text())
    assert info["added_tokens"] == [] and info["vocab_size"] == len(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(str(stage_out / "llm_base"))
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([tokenizer("a small red circle").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=ids).logits, live.llm(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_adapter_on_a_pretrained_llm_records_it_and_the_added_tokens(tmp_path, tokenizer_dir, tokenizer):
    # a "pretrained" LLM whose vocabulary lacks the tokenizer's last two tokens
    torch.manual_seed(0)
    pretrained = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 2, hidden_size=48, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    pretrained.save_pretrained(str(tmp_path / "llama"))
    cfg = tiny_model_config(tokenizer_dir, **{"llm.arch": {}, "llm.name_or_path": str(tmp_path / "llama")})
    model = with_trained_lora(build_tiny_model(cfg, tokenizer))
    out = tmp_path / "instruct" / "final"
    out.mkdir(parents=True)
    save_model_state(model, out, lora_modes(), cfg, tokenizer, prior=None)
    adapter = out / "llm_adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((tmp_path / "llama").resolve())
    info = json.loads((adapter / ADAPTER_INFO).read_text())
    assert info["added_tokens"] == tokenizer.convert_ids_to_tokens([len(tokenizer) - 2, len(tokenizer) - 1])
    assert (info["base_vocab_size"], info["vocab_size"]) == (len(tokenizer) - 2, len(tokenizer))
    assert not (out / "llm_base").exists()
    # the documented loading: the base, resized, added rows at the mean, then plain PEFT
    base = AutoModelForCausalLM.from_pretrained(info["base_model_name_or_path"])
    base.resize_token_embeddings(info["vocab_size"], mean_resizing=False)
    init_added_rows(base, info["base_vocab_size"])
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([tokenizer("a small red circle").input_ids])
    with torch.no_grad():
        expected = model.llm(input_ids=ids).logits
        torch.testing.assert_close(peft(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(PeftModel.from_pretrained(load_base(adapter), str(adapter))(input_ids=ids).logits,
                                   expected, atol=1e-5, rtol=0)


def test_cli_merge(tmp_path, lora_output, capsys):
    from vlm.app.cli import main

    _, _, stage_out = lora_output
    main(["merge", str(stage_out), "--out", str(tmp_path / "m")])
    assert "merged:" in capsys.readouterr().out and (tmp_path / "m" / "llm.safetensors").is_file()
    with pytest.raises(SystemExit) as info:
        main(["merge", str(stage_out), "--out", str(tmp_path / "m")])
    assert info.value.code == 2 and "--overwrite" in capsys.readouterr().err
