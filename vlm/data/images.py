"""Reading image files safely: pixel limit before decoding, EXIF orientation, correct RGB.

Reading image files safely: a pixel limit checked before decoding, EXIF orientation applied,
every PIL mode turned into 8-bit RGB correctly, and a check that a dataset's images exist.

- :func:`open_image` refuses an image with more than ``max_pixels`` pixels from its header alone
  (Pillow's own bomb limit is ~179 MP; a 12000 x 12000 image costs hundreds of MB per load),
  decodes it, and rotates / flips it as its EXIF orientation says.
- :func:`to_rgb` scales 16- and 32-bit integer modes (``I;16``, ``I``) and float mode ``F`` to
  8 bits (PIL's own ``convert("RGB")`` clips them, so a 16-bit PNG turns all white), composites
  transparency (RGBA, LA, PA, P with a transparent colour) on white, and converts the rest
  (L, 1, CMYK, YCbCr...) with PIL.
- :func:`check_image_files` looks for (a sample of) a dataset's image files before training,
  so a wrong ``image_root`` fails at load, not at step 1.
- :func:`unless_unreadable` runs a sample's image loading and turns an unreadable image into a
  logged skip (None), the one way training, generation and evaluation drop such a sample.
"""

from __future__ import annotations

import io
import logging
import os
import random
from typing import Callable, List, Optional, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps

from vlm.core.errors import ConfigError, ImageLoadError
from vlm.data.types import EmbeddedImage, Sample

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_PIXELS = 40_000_000
_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def open_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image at ``path``, EXIF-transposed; ImageLoadError naming the file when it
    cannot be read or has more than ``max_pixels`` pixels (checked before decoding). An
    :class:`~vlm.data.types.EmbeddedImage` is decoded from its bytes."""
    try:
        with Image.open(io.BytesIO(path.data) if isinstance(path, EmbeddedImage) else path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(f"image {path}: {width} x {height} = {width * height} pixels, more than the "
                                     f"limit of {max_pixels} (max_image_pixels); resize it")
            image.load()
            return ImageOps.exif_transpose(image)
    except ImageLoadError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files (and DecompressionBombError)
        raise ImageLoadError(f"cannot load image {path}: {exc}") from exc


def _scaled_to_8bit(image: Image.Image) -> Image.Image:
    """An ``L`` image from an integer (``I``, ``I;16*``) or float (``F``) one."""
    array = np.asarray(image)
    if image.mode == "F":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # floats in [0, 1] are intensities; anything larger is taken as 0..255 values
        scaled = array * 255.0 if array.size and array.max() <= 1.0 else array
    else:
        array = array.astype(np.float64)
        peak = array.max() if array.size else 0
        # 16-bit data (also what PIL reads 16-bit PNGs into, mode I): 65535 -> 255
        scaled = array / 257.0 if peak <= 65535 else array * (255.0 / peak)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white, as on a page."""
    if image.mode == "RGB":
        return image
    if image.mode in _INT_MODES or image.mode == "F":
        return _scaled_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_image_files(image_paths: Sequence[str], where: str, max_missing_ratio: float,
                      sample_size: int = 64, seed: int = 0) -> List[str]:
    """Check that (a sample of up to ``sample_size``) ``image_paths`` exist; ConfigError naming
    ``where`` when more than ``max_missing_ratio`` of them (or all of them) are missing. Returns
    the missing ones among those checked (images embedded in the data are not files: not checked)."""
    paths = sorted({p for p in image_paths if not isinstance(p, EmbeddedImage)})
    if not paths:
        return []
    checked = paths if len(paths) <= sample_size else random.Random(seed).sample(paths, sample_size)
    missing = [p for p in checked if not os.path.isfile(p)]
    if missing and (len(missing) == len(checked) or len(missing) > max_missing_ratio * len(checked)):
        raise ConfigError(f"{where}: {len(missing)} of {len(checked)} image files checked do not exist, e.g. "
                          f"{missing[0]}; check the datasets' image_root")
    return missing


def unless_unreadable(load: Callable[[], T], sample: Sample, skip: bool = True, where: str = "") -> Optional[T]:
    """``load()`` (which loads ``sample``'s images); when it raises ImageLoadError: with ``skip``
    a warning naming the sample (its ``source``, prefixed by ``where``) and None, else the error."""
    try:
        return load()
    except ImageLoadError as exc:
        if not skip:
            raise
        logger.warning("%sskipping sample %s: %s", f"{where}: " if where else "", sample.meta.get("source", sample.id),
                       exc)
        return None
