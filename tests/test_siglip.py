"""SigLIP / SigLIP 2 vision towers through transformers (``hf_siglip``, ``hf_siglip2``), timm
(``timm_vit``) and open_clip (``open_clip``): layer -1 / -2 features equal the library's own
hidden states at that layer (no ``post_layernorm``, no pooling head), towers saved with
``save_pretrained`` reload with the same features, ``keep_cls`` is refused (no CLS token), and a
tiny VLM with a SigLIP encoder trains."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from conftest import run_config
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from PIL import Image
from transformers import (
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlm.app.wiring import check_component
from vlm.config import ConfigError, VisionConfig
from vlm.modeling.vision import build_vision_encoder
from vlm.modeling.vision.hf_siglip import HFSiglipVisionEncoder
from vlm.modeling.vision.hf_siglip2 import HFSiglip2VisionEncoder
from vlm.modeling.vision.open_clip import OpenCLIPVisionEncoder, tag_mean_std
from vlm.modeling.vision.timm_vit import TimmViTEncoder

S, PATCH, WIDTH, LAYERS = 32, 8, 32, 3
TOWER = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             patch_size=PATCH)
SIGLIP_ARCH = dict(TOWER, image_size=S)
SIGLIP2_ARCH = dict(TOWER, num_patches=(S // PATCH) ** 2)  # a 4 x 4 position-embedding grid
TIMM_SIGLIP = "vit_base_patch16_siglip_224"
TIMM_ARCH = dict(img_size=S, patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=4, mlp_ratio=2.0)
# open_clip's SigLIP towers are timm models by name (ViT-B-16-SigLIP's vision_cfg); open_clip has
# no way to shrink the timm trunk, so this one is ViT-B wide, on 64 px images (16 patches)
OPEN_CLIP_SIGLIP = dict(timm_model_name=TIMM_SIGLIP, timm_pool="map", timm_proj="none", image_size=64)
ATOL = 1e-5


def image(size=S, seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# transformers


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_hf_siglip_features_are_transformers_hidden_states(feature_layer):
    torch.manual_seed(0)
    reference = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_ARCH)).eval()
    enc = HFSiglipVisionEncoder(VisionConfig(name="hf_siglip", feature_layer=feature_layer),
                                copy.deepcopy(reference)).eval()
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        theirs = reference(pixel_values=pixels, output_hidden_states=True)
        got = enc(pixels)
    assert enc.num_patches == 16 and enc.embed_dim == WIDTH and enc.image_size == S
    assert got.shape == (2, 16, WIDTH) and len(enc.model.encoder.layers) == LAYERS + 1 + feature_layer
    assert max_diff(got, theirs.hidden_states[feature_layer]) <= ATOL
    # not the post_layernorm'd last_hidden_state; the pooling head is gone with its weights
    assert max_diff(got, theirs.last_hidden_state) > 1e-2
    assert not any(k.startswith(("head.", "post_layernorm.")) for k in enc.model.state_dict())
    assert tuple(enc.mean) == (0.5, 0.5, 0.5) and tuple(enc.std) == (0.5, 0.5, 0.5)


def siglip2_inputs(processor_max_patches, size):
    """Two square images, and transformers' own processing of them (NaFlex patches, mask, grid)."""
    images = [image(size), image(size, seed=1)]
    processor = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=processor_max_patches)
    return images, processor(images=images, return_tensors="pt")


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_hf_siglip2_features_match_transformers_on_its_own_processing(feature_layer):
    torch.manual_seed(0)
    reference = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_ARCH)).eval()
    enc = HFSiglip2VisionEncoder(VisionConfig(name="hf_siglip2", feature_layer=feature_layer),
                                 copy.deepcopy(reference)).eval()
    assert enc.num_patches == 16 and enc.embed_dim == WIDTH and enc.image_size == S
    images, inputs = siglip2_inputs(16, S)
    assert inputs["spatial_shapes"].tolist() == [[4, 4], [4, 4]] and bool(inputs["pixel_attention_mask"].all())
    pixels = torch.stack([enc.image_transform()(im) for im in images])
    with torch.no_grad():
        theirs = reference(**inputs, output_hidden_states=True)
        got = enc(pixels)
    assert got.shape == (2, 16, WIDTH)
    assert max_diff(got, theirs.hidden_states[feature_layer]) <= ATOL
    assert max_diff(got, theirs.last_hidden_state) > 1e-2


def test_hf_siglip2_image_size_option_resamples_the_position_grid_as_transformers_does():
    torch.manual_seed(0)
    reference = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_ARCH)).eval()
    enc = HFSiglip2VisionEncoder(VisionConfig(name="hf_siglip2", feature_layer=-1, options={"image_size": 48}),
                                 copy.deepcopy(reference)).eval()
    assert enc.image_size == 48 and enc.num_patches == 36
    images, inputs = siglip2_inputs(36, 48)
    assert inputs["spatial_shapes"].tolist() == [[6, 6], [6, 6]]
    with torch.no_grad():
        theirs = reference(**inputs, output_hidden_states=True).hidden_states[-1]
        got = enc(torch.stack([enc.image_transform()(im) for im in images]))
    assert max_diff(got, theirs) <= ATOL
    with pytest.raises(ConfigError, match=r"^model\.vision\.options\.image_size: 30 "):
        HFSiglip2VisionEncoder(VisionConfig(name="hf_siglip2", options={"image_size": 30}), reference)


@pytest.mark.parametrize("name, model_class, config_class, processor_class, arch", [
    ("hf_siglip", SiglipVisionModel, SiglipVisionConfig, SiglipImageProcessor, SIGLIP_ARCH),
    ("hf_siglip2", Siglip2VisionModel, Siglip2VisionConfig, Siglip2ImageProcessor, SIGLIP2_ARCH),
])
def test_a_saved_tower_reloads_through_pretrained(tmp_path, name, model_class, config_class, processor_class, arch):
    torch.manual_seed(0)
    model_class(config_class(**arch)).save_pretrained(str(tmp_path / "plain"))
    built = build_vision_encoder(VisionConfig(name=name, arch=dict(arch), feature_layer=-2))
    torch.manual_seed(1)  # other random weights
    source = model_class(config_class(**arch))
    source.save_pretrained(str(tmp_path / "tower"))
    processor_class(image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3]).save_pretrained(str(tmp_path / "tower"))
    for feature_layer in (-1, -2):
        reloaded = build_vision_encoder(VisionConfig(name=name, pretrained=str(tmp_path / "tower"),
                                                     feature_layer=feature_layer)).eval()
        direct = type(reloaded)(VisionConfig(name=name, feature_layer=feature_layer), copy.deepcopy(source)).eval()
        pixels = torch.randn(2, 3, reloaded.image_size, reloaded.image_size)
        with torch.no_grad():
            assert torch.equal(reloaded(pixels), direct(pixels))
    assert reloaded.mean == (0.4, 0.45, 0.5) and reloaded.std == (0.2, 0.25, 0.3)
    # without a saved processor: SigLIP's 0.5 / 0.5
    plain = build_vision_encoder(VisionConfig(name=name, pretrained=str(tmp_path / "plain")))
    assert plain.mean == (0.5, 0.5, 0.5) and plain.std == (0.5, 0.5, 0.5)
    assert built.embed_dim == plain.embed_dim and built.num_patches == plain.num_patches == 16


@pytest.mark.parametrize("name, arch", [("hf_siglip", SIGLIP_ARCH), ("hf_siglip2", SIGLIP2_ARCH)])
def test_keep_cls_is_refused_naming_the_key(name, arch):
    section = VisionConfig(name=name, arch=dict(arch), keep_cls=True)
    with pytest.raises(ConfigError, match=r"^model\.vision\.keep_cls: SigLIP has no CLS token") as refused:
        check_component("vision_encoders", name, section, "model.vision", "model.vision.name", section.options)
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"^model\.vision\.keep_cls: "):
        build_vision_encoder(section)


# ---------------------------------------------------------------------------------------------
# timm and open_clip


@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_timm_vit_takes_timms_siglip_models(feature_layer):
    torch.manual_seed(0)
    reference = timm.create_model(TIMM_SIGLIP, pretrained=False, num_classes=0, **TIMM_ARCH).eval()
    assert reference.num_prefix_tokens == 0  # SigLIP: no CLS token
    cfg = VisionConfig(name="timm_vit", feature_layer=feature_layer, options={"model_name": TIMM_SIGLIP})
    enc = TimmViTEncoder(cfg, copy.deepcopy(reference)).eval()
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        theirs = reference.forward_intermediates(pixels, indices=[LAYERS + feature_layer], norm=False,
                                                 output_fmt="NLC", intermediates_only=True)[0]
        got = enc(pixels)
    assert enc.num_patches == 16 and enc.embed_dim == WIDTH and enc.image_size == S
    assert max_diff(got, theirs) <= ATOL and enc.model.attn_pool is None
    built = build_vision_encoder(VisionConfig(name="timm_vit", arch=dict(TIMM_ARCH),
                                              options={"model_name": TIMM_SIGLIP}))
    assert tuple(built.mean) == (0.5, 0.5, 0.5) and tuple(built.std) == (0.5, 0.5, 0.5)  # its webli cfg


def test_open_clip_takes_its_siglip_towers():
    torch.manual_seed(0)
    reference = _build_vision_tower(embed_dim=1, vision_cfg=CLIPVisionCfg(**OPEN_CLIP_SIGLIP)).eval()
    reference.set_input_size(64)  # as open_clip.create_model(..., force_image_size=64)
    depth = len(reference.trunk.blocks)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs = reference.forward_intermediates(pixels, indices=[depth - 2, depth - 1], intermediates_only=True,
                                                 output_fmt="NLC")["image_intermediates"]
    penultimate = OpenCLIPVisionEncoder(VisionConfig(name="open_clip", feature_layer=-2), reference).eval()
    torch.manual_seed(0)  # the same weights, built from arch (which sets the trunk's input size)
    last = build_vision_encoder(VisionConfig(name="open_clip", arch=dict(OPEN_CLIP_SIGLIP), feature_layer=-1)).eval()
    for enc, kept, expected in ((penultimate, depth - 1, theirs[0]), (last, depth, theirs[1])):
        assert enc.num_patches == 16 and enc.embed_dim == 768 and enc.image_size == 64
        assert len(enc.visual.trunk.blocks) == kept and enc.visual.trunk.attn_pool is None
        with torch.no_grad():
            assert max_diff(enc(pixels), expected) <= ATOL
        assert tuple(enc.mean) == (0.5, 0.5, 0.5) and tuple(enc.std) == (0.5, 0.5, 0.5)  # the trunk's pretrained_cfg


def test_open_clip_preprocess_tag_gives_the_tags_mean_std():
    assert tag_mean_std("ViT-B-16-SigLIP", "webli") == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert tag_mean_std("ViT-B-16-SigLIP", None) == {}
    section = VisionConfig(name="open_clip", options={"model_name": "ViT-B-16-SigLIP", "preprocess_tag": "openai"})
    with pytest.raises(ConfigError, match=r"^model\.vision\.options\.preprocess_tag: 'openai' .*its tags: webli"):
        check_component("vision_encoders", "open_clip", section, "model.vision", "model.vision.name", section.options)


# ---------------------------------------------------------------------------------------------
# a tiny VLM with a SigLIP encoder trains


def test_a_tiny_vlm_with_siglip_trains_and_reloads(tmp_path, tokenizer_dir, shapes_data):
    import vlm.app.stages
    from vlm.checkpoint.pretrained import load_pretrained

    data = {"format": "coco_captions",
            "args": {"path": shapes_data["train"]["captions"], "image_root": shapes_data["train"]["image_root"]}}
    stages = {"s": {"train": {"vision": "full", "connector": "full", "llm": "full"}, "data": [data],
                    "learning_rate": 3e-3, "batch_size": 8, "max_steps": 8, "log_every": 1, "warmup_ratio": 0.0,
                    "seed": 0}}
    model = {"vision": {"name": "hf_siglip", "arch": dict(SIGLIP_ARCH), "feature_layer": -2},
             "connector": {"name": "mlp2x_gelu"}}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model=model)
    final = vlm.app.stages.run_stage(cfg, "s")
    losses = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    reloaded, _, _ = load_pretrained(final, device="cpu")
    assert isinstance(reloaded.vision, HFSiglipVisionEncoder) and reloaded.num_image_tokens == 16
    assert tuple(reloaded.vision.mean) == (0.5, 0.5, 0.5)
