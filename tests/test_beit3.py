"""The ``beit3`` encoder (torchscale BEiT3): shapes, layer selection, its own preprocessing, and
unilm-format checkpoints reloaded at another image size (position-grid interpolation)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from vlm.config import VisionConfig
from vlm.data.image_transforms import build_transform
from vlm.modeling.vision import build_vision_encoder
from vlm.modeling.vision.beit3 import BEiT3VisionEncoder, encoder_args
from vlm.modeling.vision.beit3_weights import EXTRA_POSITIONS, VISION_POSITIONS

S, PATCH, DIM = 32, 8, 32
ARCH = dict(img_size=S, patch_size=PATCH, encoder_embed_dim=DIM, encoder_attention_heads=4,
            encoder_ffn_embed_dim=64, encoder_layers=3, vocab_size=50)


def config(**fields):
    arch = {**ARCH, **fields.pop("arch", {})}
    return VisionConfig(name="beit3", arch=arch, **fields)


def build(seed=0, **fields) -> BEiT3VisionEncoder:
    torch.manual_seed(seed)
    return build_vision_encoder(config(**fields)).eval()


def save_unilm_checkpoint(encoder_cfg, path, seed=0, fmt="pth"):
    """A tiny checkpoint as unilm writes them: the full torchscale model under ``beit3.``, in a
    ``model`` entry, next to a task head and the training arguments."""
    from vlm.modeling.vision.beit3 import init_like_unilm, torchscale_classes

    torch.manual_seed(seed)
    model = torchscale_classes()[1](encoder_args(encoder_cfg))
    init_like_unilm(model)
    with torch.no_grad():  # every tensor distinct from a fresh init, so loading is visible
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = {f"beit3.{k}": v.clone() for k, v in model.state_dict().items()}
    weights["head.weight"] = torch.randn(3, DIM)
    if fmt == "safetensors":
        save_file(weights, str(path))
    else:
        torch.save({"model": weights, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, path)
    return model


def test_shapes_own_normalisation_and_default_preprocessing():
    enc = build()
    assert enc.embed_dim == DIM and enc.image_size == S and enc.num_patches == (S // PATCH) ** 2
    assert tuple(enc.mean) == (0.5, 0.5, 0.5) and tuple(enc.std) == (0.5, 0.5, 0.5)
    features = enc(torch.randn(2, 3, S, S))
    assert features.shape == (2, 16, DIM)
    assert build(keep_cls=True)(torch.randn(1, 3, S, S)).shape == (1, 17, DIM)
    # preprocess unset: BEiT3's bicubic square resize (aspect not kept) with 0.5 / 0.5
    photo = Image.fromarray(skdata.coffee())  # 600 x 400
    pixels = enc.image_transform()(photo)
    torch.testing.assert_close(pixels, build_transform("resize", S, (0.5,) * 3, (0.5,) * 3)(photo))
    assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6
    # an explicit strategy still wins
    assert not torch.allclose(build(preprocess="resize_center_crop").image_transform()(photo), pixels)


@pytest.mark.parametrize("feature_layer,kept", [(-2, 2), (-1, 3), (0, 0), (1, 1)])
def test_feature_layer_is_that_hidden_state_of_the_full_model(feature_layer, kept):
    full = build(feature_layer=-1)  # all 3 blocks
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        out = full.beit3.encoder(src_tokens=None, token_embeddings=full.beit3.vision_embed(pixels),
                                 multiway_split_position=-1, return_all_hiddens=True)
    enc = BEiT3VisionEncoder(config(feature_layer=feature_layer), copy.deepcopy(full.beit3)).eval()
    assert len(enc.beit3.encoder.layers) == kept
    with torch.no_grad():
        got = enc(pixels)
    torch.testing.assert_close(got, out["encoder_states"][kept][:, 1:], atol=1e-6, rtol=0)


def test_final_norm_option_applies_the_vision_experts_final_layernorm():
    torch.manual_seed(0)
    cfg = config(feature_layer=-1, options={"final_norm": True})
    enc = build_vision_encoder(cfg).eval()
    plain = BEiT3VisionEncoder(config(feature_layer=-1), copy.deepcopy(enc.beit3)).eval()
    pixels = torch.randn(1, 3, S, S)
    with torch.no_grad():
        expected = enc.beit3.encoder.layer_norm.A(plain(pixels))
        torch.testing.assert_close(enc(pixels), expected, atol=1e-6, rtol=0)
    assert plain.beit3.encoder.layer_norm is None


@pytest.mark.parametrize("size,dim,layers", [("base", 768, 12), ("large", 1024, 24)])
def test_size_presets_are_unilms(size, dim, layers):
    args = encoder_args(VisionConfig(name="beit3", options={"size": size}))
    assert (args.encoder_embed_dim, args.encoder_layers, args.encoder_ffn_embed_dim) == (dim, layers, 4 * dim)
    assert args.encoder_attention_heads == dim // 64 and args.vocab_size == 64010
    assert args.img_size == 224 and args.patch_size == 16 and args.multiway
    assert encoder_args(VisionConfig(name="beit3", options={"size": size}, arch={"img_size": 336})).img_size == 336


# ---------------------------------------------------------------------------------------------
# unilm checkpoints


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_checkpoint_reloaded_at_its_own_size_gives_the_models_features(tmp_path, fmt):
    path = tmp_path / f"beit3.{fmt}"
    source = save_unilm_checkpoint(config(), path, fmt=fmt)
    enc = build(seed=1, pretrained=str(path))
    reference = BEiT3VisionEncoder(config(), source).eval()
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), reference(pixels), atol=0, rtol=0)
    # both experts come from the file, not from the random init
    for branch in ("A", "B"):
        name = f"encoder.layers.0.ffn.{branch}.fc1.weight"
        assert torch.equal(enc.beit3.state_dict()[name], source.state_dict()[name])
    assert torch.equal(enc.beit3.text_embed.weight, source.text_embed.weight)


def test_checkpoint_reloaded_at_another_size_interpolates_only_the_position_grid(tmp_path):
    path = tmp_path / "beit3_32.pth"
    source = save_unilm_checkpoint(config(), path)
    enc = build(seed=1, pretrained=str(path), arch={"img_size": 48}, feature_layer=-1)
    assert enc.image_size == 48 and enc.num_patches == 36
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, DIM)

    loaded, original = enc.beit3.state_dict(), source.state_dict()
    for key, value in loaded.items():
        if key != VISION_POSITIONS:
            assert torch.equal(value, original[key]), key
    old, new = original[VISION_POSITIONS], loaded[VISION_POSITIONS]
    assert new.shape == (EXTRA_POSITIONS + 36, DIM)
    assert torch.equal(new[:EXTRA_POSITIONS], old[:EXTRA_POSITIONS]), "padding rows and CLS kept"
    # the grid resized as unilm does it: bicubic, align_corners=False, no antialiasing
    grid = old[EXTRA_POSITIONS:].reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new[EXTRA_POSITIONS:], expected.permute(0, 2, 3, 1).reshape(36, DIM),
                               atol=1e-6, rtol=0)
    # a smooth table stays smooth: the mean of the grid is nearly kept
    torch.testing.assert_close(new[EXTRA_POSITIONS:].mean(0), old[EXTRA_POSITIONS:].mean(0), atol=0.02, rtol=0)


def test_downsizing_interpolates_too(tmp_path):
    path = tmp_path / "beit3_48.pth"
    save_unilm_checkpoint(config(arch={"img_size": 48}), path)
    enc = build(pretrained=str(path))  # 32 px: 6x6 -> 4x4
    assert enc.beit3.encoder.embed_positions.A.weight.shape == (EXTRA_POSITIONS + 16, DIM)


def test_checkpoint_errors_name_the_file(tmp_path):
    not_beit3 = tmp_path / "other.pth"
    torch.save({"model": {"visual.proj": torch.zeros(2)}}, not_beit3)
    with pytest.raises(ValueError, match="other.pth.*not a unilm BEiT3 checkpoint"):
        build(pretrained=str(not_beit3))
    wider = tmp_path / "wider.pth"
    save_unilm_checkpoint(config(arch={"encoder_ffn_embed_dim": 96}), wider)
    with pytest.raises(ValueError, match="wider.pth.*does not fit"):
        build(pretrained=str(wider))
    deeper = tmp_path / "deeper.pth"
    save_unilm_checkpoint(config(arch={"encoder_layers": 4}), deeper)
    with pytest.raises(ValueError, match="deeper.pth.*unexpected"):
        build(pretrained=str(deeper))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build(pretrained=str(tmp_path / "missing.pth"))


def test_trained_encoder_weights_round_trip_through_safetensors(tmp_path):
    """A fully trained encoder is saved as its own state dict (the checkpoint manifest's
    ``vision.safetensors``) and reloads into a fresh build of the same config."""
    from safetensors.torch import load_model, save_model

    enc = build(seed=0)
    save_model(enc, str(tmp_path / "vision.safetensors"))
    again = build(seed=1)
    load_model(again, str(tmp_path / "vision.safetensors"), strict=True)
    pixels = torch.randn(1, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), enc(pixels), atol=0, rtol=0)
