"""The ``timm_vit`` encoder: layer selection, prefix tokens, normalisation from timm's
pretrained config, QuickGELU, and weights from local files (timm's and OpenAI / open_clip's)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

from vlm.config import VisionConfig
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD
from vlm.modeling.vision import build_vision_encoder
from vlm.modeling.vision.timm_vit import TimmViTEncoder

S = 32
ARCH = dict(img_size=S, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0)
CLIP_NAME = "vit_base_patch16_clip_224"


def timm_model(name=CLIP_NAME, **kwargs):
    return timm.create_model(name, pretrained=False, num_classes=0, **{**ARCH, **kwargs}).eval()


def config(name=CLIP_NAME, **fields):
    options = {"model_name": name, **fields.pop("options", {})}
    return VisionConfig(name="timm_vit", arch=dict(fields.pop("arch", ARCH)), options=options, **fields)


@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("feature_layer,kept", [(-2, 2), (-1, 3), (1, 1), (3, 3)])
def test_feature_layer_selects_that_blocks_output_and_prunes_the_rest(feature_layer, kept, keep_cls):
    torch.manual_seed(0)
    reference = timm_model()
    enc = TimmViTEncoder(config(feature_layer=feature_layer, keep_cls=keep_cls), copy.deepcopy(reference)).eval()
    assert len(enc.model.blocks) == kept
    assert enc.num_patches == 16 + keep_cls and enc.embed_dim == 32 and enc.image_size == S
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        # by hand: embeddings, then the first `kept` blocks, no final norm
        x = reference.norm_pre(reference._pos_embed(reference.patch_embed(pixels)))
        for block in reference.blocks[:kept]:
            x = block(x)
        got = enc(pixels)
    torch.testing.assert_close(got, x if keep_cls else x[:, 1:], atol=1e-6, rtol=0)


def test_layers_differ_so_the_selection_matters():
    torch.manual_seed(0)
    reference = timm_model()
    pixels = torch.randn(1, 3, S, S)
    with torch.no_grad():
        a = TimmViTEncoder(config(feature_layer=-1), copy.deepcopy(reference))(pixels)
        b = TimmViTEncoder(config(feature_layer=-2), copy.deepcopy(reference))(pixels)
    assert (a - b).abs().mean() > 1e-3  # far above the 1e-6 the selection test allows


def test_embedding_layer_is_refused():
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision_encoder(config(feature_layer=0))


def test_register_tokens_count_as_prefix_tokens():
    torch.manual_seed(0)
    enc = build_vision_encoder(config("vit_base_patch16_224", arch={**ARCH, "reg_tokens": 2}, keep_cls=True))
    assert enc.num_patches == 16 + 3
    assert enc(torch.randn(1, 3, S, S)).shape == (1, 19, 32)


def test_normalisation_comes_from_the_pretrained_tag():
    openai = build_vision_encoder(config("vit_base_patch16_clip_224.openai"))
    assert tuple(openai.mean) == pytest.approx(CLIP_MEAN) and tuple(openai.std) == pytest.approx(CLIP_STD)
    laion = build_vision_encoder(config("vit_base_patch16_clip_224.laion2b"))
    augreg = build_vision_encoder(config("vit_base_patch16_224.augreg_in21k"))
    assert tuple(augreg.mean) == (0.5, 0.5, 0.5) and tuple(augreg.std) == (0.5, 0.5, 0.5)
    assert tuple(laion.mean) == tuple(timm.get_pretrained_cfg("vit_base_patch16_clip_224.laion2b").mean)


def test_quick_gelu_option_builds_quick_gelu_mlps():
    from timm.layers import QuickGELU

    enc = build_vision_encoder(config(options={"quick_gelu": True}))
    assert all(isinstance(block.mlp.act, QuickGELU) for block in enc.model.blocks)
    plain = build_vision_encoder(config())
    assert not any(isinstance(block.mlp.act, QuickGELU) for block in plain.model.blocks)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_load_from_a_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm_model()
    path = tmp_path / f"vit{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(1)  # a different random init, overwritten by the file
    enc = build_vision_encoder(config(pretrained=str(path))).eval()
    reference = TimmViTEncoder(config(), source).eval()
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), reference(pixels), atol=0, rtol=0)


def test_openai_format_checkpoint_loads_through_timms_filter_and_matches_open_clip(tmp_path):
    """An OpenAI / open_clip checkpoint (``visual.*`` keys) read by timm_vit with quick_gelu
    gives open_clip's features."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from vlm.modeling.vision.open_clip import OpenCLIPVisionEncoder

    torch.manual_seed(0)
    visual = _build_vision_tower(embed_dim=16, quick_gelu=True, vision_cfg=CLIPVisionCfg(
        layers=3, width=32, head_width=8, mlp_ratio=2.0, patch_size=8, image_size=S))
    path = tmp_path / "openai_clip.pt"
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, path)
    enc = build_vision_encoder(config(pretrained=str(path), options={"quick_gelu": True})).eval()
    reference = OpenCLIPVisionEncoder(VisionConfig(name="open_clip"), visual).eval()
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), reference(pixels), atol=1e-5, rtol=0)


def test_pretrained_at_another_image_size_resamples_the_position_grid(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_model().state_dict().items()}, str(path))
    enc = build_vision_encoder(config(pretrained=str(path), arch={**ARCH, "img_size": 48}))
    assert enc.image_size == 48 and enc.num_patches == 36
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        build_vision_encoder(config(pretrained=str(tmp_path / "nowhere.safetensors")))
