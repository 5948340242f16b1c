"""Image preprocessing strategies shared by every vision encoder.

Each strategy turns a PIL image of any mode (L, RGBA, P, ...) into a normalised
``(3, size, size)`` float tensor:

- ``resize``: bicubic resize to a square, aspect ratio not kept (BEiT3-style);
- ``pad``: pad to a square with the mean colour, then resize (LLaVA's "pad");
- ``resize_center_crop``: resize the short side, then center crop (CLIP's default).

A strategy is registered as a function ``(size, mean, std) -> transform``; the registry holds it
as a :class:`Transform` component (``build(None, TransformContext(size, mean, std))``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from vlm.core.registry import FunctionComponent, Registry
from vlm.data.images import to_rgb  # noqa: F401  (re-exported: vlm.data.image_transforms.to_rgb)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageTransform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class TransformContext:
    """What an image transform is built for: the encoder's square input side and its
    normalisation mean and std."""

    size: int
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD


class Transform(FunctionComponent):
    """A preprocessing strategy function ``(size, mean, std)`` as a component: no options;
    ``build`` calls it with the context's size, mean and std."""

    def build(self, options: Optional[Mapping[str, Any]], ctx: TransformContext) -> ImageTransform:
        return self.fn(ctx.size, ctx.mean, ctx.std)


PREPROCESSING: Registry[Transform] = Registry("preprocessing strategy", adapt=Transform.adapt)


def _normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), list(mean), list(std))


@PREPROCESSING.register("resize")
def resize(size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """Bicubic resize to ``size x size`` (aspect ratio not kept)."""

    def transform(image: Image.Image) -> torch.Tensor:
        image = TF.resize(to_rgb(image), [size, size], InterpolationMode.BICUBIC, antialias=True)
        return _normalize(image, mean, std)

    return transform


@PREPROCESSING.register("pad")
def pad_to_square(size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """Pad to a square with the normalisation mean colour (so padding becomes ~zeros), then resize.

    The colour is ``int(m * 255)``, truncated as in LLaVA's ``expand2square`` and transformers'
    ``LlavaImageProcessor(do_pad=True)``, so an exported model's processor gives the same pixels."""
    fill = tuple(int(m * 255) for m in mean)

    def transform(image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        w, h = image.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        canvas = TF.resize(canvas, [size, size], InterpolationMode.BICUBIC, antialias=True)
        return _normalize(canvas, mean, std)

    return transform


@PREPROCESSING.register("resize_center_crop")
def resize_center_crop(size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """Resize the short side to ``size`` (bicubic), then center crop ``size x size``."""

    def transform(image: Image.Image) -> torch.Tensor:
        image = TF.resize(to_rgb(image), size, InterpolationMode.BICUBIC, antialias=True)
        return _normalize(TF.center_crop(image, [size, size]), mean, std)

    return transform


def build_transform(strategy: str, size: int, mean: Sequence[float], std: Sequence[float]) -> ImageTransform:
    """The transform for a registered strategy name (``Transform.build``)."""
    return PREPROCESSING.get(strategy).build(None, TransformContext(size, mean, std))
