"""The same CLIP ViT weights in open_clip, transformers and timm give the same layer -2 patch
features (fp32, within 1e-5): weights are copied between the three libraries with
``vlm.modeling.vision.clip_weights``."""

from __future__ import annotations

import pytest
import timm
import torch
from open_clip.model import CLIPVisionCfg, _build_vision_tower
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from vlm.config import VisionConfig
from vlm.modeling.vision.clip_weights import (
    convert_clip_vision,
    hf_to_open_clip,
    open_clip_to_hf,
    open_clip_to_timm,
    timm_to_open_clip,
)
from vlm.modeling.vision.hf_clip import HFCLIPVisionEncoder
from vlm.modeling.vision.open_clip import OpenCLIPVisionEncoder
from vlm.modeling.vision.timm_vit import TimmViTEncoder

S, PATCH, WIDTH, HEADS, LAYERS, MLP = 32, 8, 32, 4, 3, 64
PROJ = 16
LAYOUTS = ["open_clip", "hf_clip", "timm_vit"]


def library_models(quick_gelu: bool):
    """Full (unpruned) vision towers of the three libraries, randomly initialised."""
    visual = _build_vision_tower(
        embed_dim=PROJ, quick_gelu=quick_gelu,
        vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=MLP / WIDTH,
                                 patch_size=PATCH, image_size=S))
    hf = CLIPVisionModel(CLIPVisionConfig(
        image_size=S, patch_size=PATCH, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, hidden_act="quick_gelu" if quick_gelu else "gelu"))
    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=PROJ, img_size=S,
                            patch_size=PATCH, embed_dim=WIDTH, depth=LAYERS, num_heads=HEADS,
                            mlp_ratio=MLP / WIDTH, act_layer="quick_gelu" if quick_gelu else None)
    return {"open_clip": visual, "hf_clip": hf, "timm_vit": vit}


def encoders(models, quick_gelu):
    """Our encoders around the library models (layer -2, CLS dropped)."""
    return {
        "open_clip": OpenCLIPVisionEncoder(VisionConfig(name="open_clip"), models["open_clip"]),
        "hf_clip": HFCLIPVisionEncoder(VisionConfig(name="hf_clip"), models["hf_clip"]),
        "timm_vit": TimmViTEncoder(VisionConfig(name="timm_vit", options={
            "model_name": "vit_base_patch16_clip_224", "quick_gelu": quick_gelu}), models["timm_vit"]),
    }


def load_exactly(model, state, allowed_missing=()):
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= set(allowed_missing) and not unexpected, (missing, unexpected)


@pytest.mark.parametrize("quick_gelu", [True, False])
@pytest.mark.parametrize("source", LAYOUTS)
def test_same_weights_give_the_same_layer_minus_2_features_in_all_three_libraries(source, quick_gelu):
    torch.manual_seed(0)
    models = library_models(quick_gelu)
    state = models[source].state_dict()
    for target in LAYOUTS:
        if target == source:
            continue
        converted = convert_clip_vision(state, source, target)
        # transformers' CLIPVisionModel has no projection, so a copy from it leaves the others' as is
        allowed = {"open_clip": ["proj"], "timm_vit": ["head.weight", "head.bias"]}.get(target, ())
        load_exactly(models[target], converted, allowed if source == "hf_clip" else ())
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        features = {name: enc.eval()(pixels) for name, enc in encoders(models, quick_gelu).items()}
    reference = features[source]
    assert reference.shape == (2, (S // PATCH) ** 2, WIDTH)
    assert reference.abs().mean() > 0.1
    for name, got in features.items():
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=0, msg=f"{source} -> {name}")


def test_activation_mismatch_is_visible():
    """The check has teeth: OpenAI weights read with GELU instead of QuickGELU differ."""
    torch.manual_seed(0)
    quick = library_models(True)
    plain = library_models(False)
    load_exactly(plain["timm_vit"], open_clip_to_timm(quick["open_clip"].state_dict()))
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        a = encoders(quick, True)["open_clip"].eval()(pixels)
        b = encoders(plain, False)["timm_vit"].eval()(pixels)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("there,back", [(open_clip_to_hf, hf_to_open_clip),
                                        (open_clip_to_timm, timm_to_open_clip)])
def test_round_trips_preserve_every_tensor(there, back):
    torch.manual_seed(0)
    state = library_models(True)["open_clip"].state_dict()
    kwargs = {"with_projection": True} if there is open_clip_to_hf else {}
    again = back(there(state, **kwargs))
    assert set(again) == set(state)
    for key in state:
        assert torch.equal(again[key], state[key]), key


def test_with_projection_fits_clip_vision_model_with_projection():
    torch.manual_seed(0)
    models = library_models(True)
    config = models["hf_clip"].config
    config.projection_dim = PROJ
    hf = CLIPVisionModelWithProjection(config)
    load_exactly(hf, open_clip_to_hf(models["open_clip"].state_dict(), with_projection=True))
    torch.testing.assert_close(hf.visual_projection.weight, models["open_clip"].proj.t())


def test_open_clip_to_timm_agrees_with_timms_own_openai_converter():
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    models = library_models(True)
    ours = open_clip_to_timm(models["open_clip"].state_dict())
    theirs = checkpoint_filter_fn({f"visual.{k}": v for k, v in models["open_clip"].state_dict().items()},
                                  models["timm_vit"])
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)


def test_unknown_tensors_and_layouts_are_refused():
    torch.manual_seed(0)
    state = dict(library_models(True)["open_clip"].state_dict())
    state["transformer.resblocks.0.ls_1.gamma"] = torch.ones(WIDTH)
    with pytest.raises(KeyError, match="ls_1"):
        open_clip_to_timm(state)
    with pytest.raises(ValueError, match="known layouts"):
        convert_clip_vision({}, "open_clip", "beit3")
