"""Each encoder preprocesses real photos (scikit-image: RGB, grayscale, RGBA) with every
strategy using its own normalisation: CLIP's for the CLIP backbones, timm's pretrained config
for timm_vit, 0.5 / 0.5 for BEiT3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VISION_ARCH
from PIL import Image
from skimage import data as skdata

from vlm.config import VisionConfig
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlm.modeling.vision import build_vision_encoder

S = 32
STRATEGIES = ["resize", "pad", "resize_center_crop"]
ENCODERS = {
    "hf_clip": (VisionConfig(name="hf_clip", arch=dict(VISION_ARCH)), CLIP_MEAN, CLIP_STD),
    "open_clip": (VisionConfig(name="open_clip", arch=dict(layers=2, width=32, head_width=8, patch_size=8,
                                                           image_size=S)), CLIP_MEAN, CLIP_STD),
    "timm_vit openai": (VisionConfig(name="timm_vit", options={"model_name": "vit_base_patch16_clip_224.openai"},
                                     arch=dict(img_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=4)),
                        CLIP_MEAN, CLIP_STD),
    "timm_vit augreg": (VisionConfig(name="timm_vit", options={"model_name": "vit_base_patch16_224.augreg_in21k"},
                                     arch=dict(img_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=4)),
                        (0.5,) * 3, (0.5,) * 3),
    "beit3": (VisionConfig(name="beit3", arch=dict(img_size=S, patch_size=8, encoder_embed_dim=32,
                                                   encoder_attention_heads=4, encoder_ffn_embed_dim=64,
                                                   encoder_layers=2, vocab_size=10)), (0.5,) * 3, (0.5,) * 3),
}


def photos():
    logo = skdata.logo().copy()  # RGBA, opaque in scikit-image: cut a transparent band into it
    logo[:100, :, 3] = 0
    return {
        "rgb": Image.fromarray(skdata.astronaut()),
        "gray": Image.fromarray(skdata.camera()),
        "rgba": Image.fromarray(logo, mode="RGBA"),
        "wide": Image.fromarray(skdata.coffee()),  # 600 x 400
    }


def raw(pixels, mean, std):
    return pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {name: build_vision_encoder(cfg) for name, (cfg, _, _) in ENCODERS.items()}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_each_encoder_normalises_with_its_own_mean_and_std(encoders, name):
    enc = encoders[name]
    _, mean, std = ENCODERS[name]
    assert tuple(enc.mean) == pytest.approx(mean) and tuple(enc.std) == pytest.approx(std)
    for strategy in STRATEGIES:
        # the photo's own pixels in [0, 1] ("pad" fills with the mean colour, so it needs the mean)
        plain = build_transform(strategy, S, mean if strategy == "pad" else (0.0,) * 3, (1.0,) * 3)
        for kind, photo in photos().items():
            pixels = enc.image_transform(strategy)(photo)
            assert pixels.shape == (3, S, S), (strategy, kind)
            # undoing the encoder's own normalisation gives the photo's pixels back
            expected = raw(plain(photo), mean if strategy == "pad" else (0.0,) * 3, (1.0,) * 3)
            torch.testing.assert_close(raw(pixels, mean, std), expected, atol=1e-5, rtol=0)
            assert enc(pixels[None]).shape == (1, enc.num_patches, enc.embed_dim)


@pytest.mark.parametrize("name", ["hf_clip", "beit3"])
def test_pad_fills_with_the_encoders_mean_colour(encoders, name):
    """The wide photo's padding bands are that encoder's mean colour: zeros once normalised."""
    pixels = encoders[name].image_transform("pad")(photos()["wide"])  # 3:2, so S/6 rows each side
    band = S // 6 - 1
    assert pixels[:, :band].abs().max() < 0.02 and pixels[:, S - band:].abs().max() < 0.02
    assert pixels[:, band + 2: S - band - 2].abs().mean() > 0.3, "the photo is in between"


def test_grayscale_and_transparency_through_an_encoder(encoders):
    enc = encoders["beit3"]
    for strategy in STRATEGIES:
        gray = raw(enc.image_transform(strategy)(photos()["gray"]), enc.mean, enc.std)
        torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(gray[1], gray[2], atol=1e-5, rtol=0)
    rgba = raw(enc.image_transform("resize")(photos()["rgba"]), enc.mean, enc.std)
    top = rgba[:, : 100 * S // 500 - 1]  # the transparent band, resized
    torch.testing.assert_close(top, torch.ones_like(top), atol=1e-4, rtol=0)
    assert (rgba[:, S // 2:] < 0.9).any(), "the opaque logo keeps its colours"


def test_the_same_photo_differs_between_clip_and_beit3_normalisation(encoders):
    photo = photos()["rgb"]
    clip = encoders["hf_clip"].image_transform("resize")(photo)
    beit3 = encoders["beit3"].image_transform("resize")(photo)
    assert (clip - beit3).abs().mean() > 0.05
    assert np.isclose(float(raw(clip, CLIP_MEAN, CLIP_STD).mean()), float(raw(beit3, (0.5,) * 3, (0.5,) * 3).mean()),
                      atol=1e-5)
