"""Vision encoders built from inline architectures, and the image preprocessing strategies on
real photographs (scikit-image's sample images)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import VISION_ARCH
from PIL import Image
from skimage import data as skdata

from vlm.config import ConnectorConfig, VisionConfig
from vlm.data.image_transforms import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSING,
    build_transform,
    to_rgb,
)
from vlm.modeling.connectors import BuildContext, build_connector
from vlm.modeling.vision import build_vision_encoder

OPEN_CLIP_ARCH = dict(layers=3, width=32, head_width=8, mlp_ratio=2.0, patch_size=8, image_size=32)
STRATEGIES = ["resize", "pad", "resize_center_crop"]
S = 32


def encoder(name, **kwargs):
    arch = OPEN_CLIP_ARCH if name == "open_clip" else VISION_ARCH
    return build_vision_encoder(VisionConfig(name=name, arch=dict(arch), **kwargs)).eval()


def normalised(rgb):
    """The normalised value of an RGB colour given in 0..1."""
    return torch.tensor([(c - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


# ---------------------------------------------------------------------------------------------
# encoders


@pytest.mark.parametrize("name", ["hf_clip", "open_clip"])
@pytest.mark.parametrize("keep_cls", [False, True])
def test_encoder_output_shape_and_connector_token_count(name, keep_cls):
    torch.manual_seed(0)
    enc = encoder(name, keep_cls=keep_cls)
    assert enc.image_size == S and enc.embed_dim == 32
    assert enc.num_patches == (S // 8) ** 2 + keep_cls
    features = enc(torch.randn(2, 3, S, S))
    assert features.shape == (2, enc.num_patches, enc.embed_dim)
    connector = build_connector(ConnectorConfig(name="mlp2x_gelu"), BuildContext(enc.embed_dim, 48))
    tokens = connector(features)
    assert tokens.shape == (2, connector.num_tokens(enc.num_patches), 48)
    assert connector.num_tokens(enc.num_patches) == enc.num_patches


@pytest.mark.parametrize("keep_cls", [False, True])
@pytest.mark.parametrize("feature_layer,kept", [(-2, 2), (-1, 3), (1, 1)])
def test_open_clip_encoder_prunes_blocks_and_matches_forward_intermediates(feature_layer, kept, keep_cls):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    from vlm.modeling.vision.open_clip import OpenCLIPVisionEncoder

    torch.manual_seed(0)
    reference = _build_vision_tower(embed_dim=1, vision_cfg=CLIPVisionCfg(**OPEN_CLIP_ARCH), quick_gelu=False).eval()
    enc = OpenCLIPVisionEncoder(VisionConfig(name="open_clip", feature_layer=feature_layer, keep_cls=keep_cls),
                                copy.deepcopy(reference)).eval()
    assert len(enc.visual.transformer.resblocks) == kept
    pixels = torch.randn(2, 3, S, S)
    with torch.no_grad():
        out = reference.forward_intermediates(pixels, indices=[kept - 1], intermediates_only=True,
                                              output_fmt="NLC", output_extra_tokens=True)
        patches, cls = out["image_intermediates"][0], out["image_intermediates_prefix"][0]
        expected = torch.cat([cls, patches], dim=1) if keep_cls else patches
        got = enc(pixels)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_open_clip_encoder_refuses_the_embedding_layer():
    with pytest.raises(ValueError, match="feature_layer"):
        encoder("open_clip", feature_layer=0)


@pytest.mark.parametrize("name", ["hf_clip", "open_clip"])
def test_encoder_image_transform_gives_its_input_size(name):
    enc = encoder(name, preprocess="pad")
    image = Image.fromarray(skdata.coffee())
    pixels = enc.image_transform()(image)
    assert pixels.shape == (3, S, S) and pixels.dtype == torch.float32
    assert enc(pixels[None]).shape == (1, enc.num_patches, enc.embed_dim)


# ---------------------------------------------------------------------------------------------
# preprocessing on real photos


def photos():
    astronaut = skdata.astronaut()  # RGB 512 x 512
    camera = skdata.camera()  # grayscale 512 x 512
    logo = skdata.logo()  # RGBA 500 x 500
    assert astronaut.ndim == 3 and camera.ndim == 2 and logo.shape[-1] == 4
    return {
        "astronaut_rgb": Image.fromarray(astronaut),
        "camera_gray": Image.fromarray(camera),
        "logo_rgba": Image.fromarray(logo, mode="RGBA"),
        "astronaut_wide": Image.fromarray(astronaut[128:384]),  # 512 wide, 256 tall
        "coffee_rgb": Image.fromarray(skdata.coffee()),  # 600 x 400
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_gives_normalised_3_channel_square_tensors(strategy):
    transform = build_transform(strategy, S, CLIP_MEAN, CLIP_STD)
    lo, hi = normalised((0, 0, 0)), normalised((1, 1, 1))
    for name, image in photos().items():
        pixels = transform(image)
        assert pixels.shape == (3, S, S), name
        assert pixels.dtype == torch.float32, name
        assert torch.isfinite(pixels).all(), name
        for c in range(3):
            assert lo[c] - 1e-4 <= pixels[c].min() and pixels[c].max() <= hi[c] + 1e-4, name
        assert pixels.std() > 0.1, f"{name}: the photo's content should survive"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_grayscale_gives_equal_channels_before_normalisation(strategy):
    pixels = build_transform(strategy, S, CLIP_MEAN, CLIP_STD)(photos()["camera_gray"])
    raw = pixels * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[1], raw[2], atol=1e-5, rtol=0)


def test_pad_keeps_the_aspect_ratio_with_mean_colour_bands():
    wide = photos()["astronaut_wide"]  # 2:1, so a quarter of the square on top and at the bottom is padding
    pixels = build_transform("pad", S, CLIP_MEAN, CLIP_STD)(wide)
    band = S // 4
    inner = 2  # rows next to the photo may blend with it when resizing
    padding = torch.cat([pixels[:, : band - inner], pixels[:, S - band + inner:]], dim=1)
    assert padding.abs().max() < 0.02, "padding is the mean colour, ~0 after normalisation"
    photo_rows = pixels[:, band + inner: S - band - inner]
    assert (photo_rows.abs().amax(dim=(0, 2)) > 0.1).all(), "every photo row has content"
    # the band holds the whole photo at its own aspect ratio: compare with resizing it to S x S/2
    from torchvision.transforms import functional as TF

    kept = TF.normalize(TF.to_tensor(wide.resize((S, S // 2), Image.BICUBIC)), CLIP_MEAN, CLIP_STD)
    band_rows = pixels[:, band + inner: S - band - inner]
    assert (band_rows - kept[:, inner: S // 2 - inner]).abs().mean() < 0.1
    squashed = build_transform("resize", S, CLIP_MEAN, CLIP_STD)(wide)
    assert (squashed - pixels).abs().mean() > 0.3, "pad must differ from squashing"


def test_pad_on_a_square_photo_is_a_plain_resize():
    square = photos()["astronaut_rgb"]
    padded = build_transform("pad", S, CLIP_MEAN, CLIP_STD)(square)
    resized = build_transform("resize", S, CLIP_MEAN, CLIP_STD)(square)
    torch.testing.assert_close(padded, resized, atol=1e-6, rtol=0)


def test_resize_squashes_but_resize_center_crop_crops():
    # left third red, middle third green, right third blue, 3:1 wide
    stripes = np.zeros((S, 3 * S, 3), dtype=np.uint8)
    stripes[:, :S, 0] = 255
    stripes[:, S: 2 * S, 1] = 255
    stripes[:, 2 * S:, 2] = 255
    image = Image.fromarray(stripes)
    cropped = build_transform("resize_center_crop", S, CLIP_MEAN, CLIP_STD)(image)
    green = normalised((0, 1, 0))[:, None, None].expand(3, S, S)
    torch.testing.assert_close(cropped, green, atol=1e-5, rtol=0)
    squashed = build_transform("resize", S, CLIP_MEAN, CLIP_STD)(image)
    torch.testing.assert_close(squashed[:, :, :4], normalised((1, 0, 0))[:, None, None].expand(3, S, 4),
                               atol=0.05, rtol=0)
    torch.testing.assert_close(squashed[:, :, -4:], normalised((0, 0, 1))[:, None, None].expand(3, S, 4),
                               atol=0.05, rtol=0)


def test_resize_center_crop_on_a_real_wide_photo_keeps_its_centre():
    wide = np.asarray(photos()["coffee_rgb"])  # 400 tall, 600 wide
    h, w = wide.shape[:2]
    centre = Image.fromarray(wide[:, (w - h) // 2: (w - h) // 2 + h])
    cropped = build_transform("resize_center_crop", S, CLIP_MEAN, CLIP_STD)(Image.fromarray(wide))
    of_centre = build_transform("resize", S, CLIP_MEAN, CLIP_STD)(centre)
    squashed = build_transform("resize", S, CLIP_MEAN, CLIP_STD)(Image.fromarray(wide))
    near = (cropped - of_centre).abs().mean()
    far = (cropped - squashed).abs().mean()
    assert near < 0.05 and far > 3 * near, (float(near), float(far))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transparent_pixels_become_white(strategy):
    rgba = np.dstack([skdata.astronaut(), np.full((512, 512), 255, dtype=np.uint8)])
    rgba[:, :256, :3] = 0  # black but fully transparent on the left half
    rgba[:, :256, 3] = 0
    pixels = build_transform(strategy, S, CLIP_MEAN, CLIP_STD)(Image.fromarray(rgba, mode="RGBA"))
    left = pixels[:, :, : S // 2 - 2]
    white = normalised((1, 1, 1))[:, None, None]
    torch.testing.assert_close(left, white.expand_as(left), atol=1e-4, rtol=0)
    assert (pixels[:, :, S // 2 + 2:] - white).abs().max() > 0.5, "the opaque half keeps the photo"


def test_opaque_rgba_logo_keeps_its_colours_and_a_transparent_ring_turns_white():
    logo = skdata.logo()  # RGBA, fully opaque in scikit-image
    rgb = np.asarray(to_rgb(Image.fromarray(logo, mode="RGBA")))
    assert (rgb == logo[..., :3]).all()
    holed = logo.copy()
    holed[:50, :, 3] = 0  # make the top rows transparent
    holed[50:100, :, 3] = 128  # and the next ones half transparent
    rgb = np.asarray(to_rgb(Image.fromarray(holed, mode="RGBA"))).astype(int)
    assert (rgb[:50] == 255).all()
    blended = (logo[50:100, :, :3].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(rgb[50:100] - blended).max() <= 2


def test_palette_image_with_transparency_becomes_white():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.info["transparency"] = 0
    rgb = np.asarray(to_rgb(p))
    assert (rgb[:, 4:] == 255).all() and (rgb[:, :4] == [200, 10, 10]).all()


def test_registered_strategies_are_the_documented_three():
    assert set(STRATEGIES) <= set(PREPROCESSING.names())
