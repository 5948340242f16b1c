"""AnyRes tiling, data side: the grid per image, its tiles' pixels and its visual-token count.

LLaVA-NeXT's scheme (docs/resolution.md). An image of ``H x W`` pixels is resized, keeping its
aspect ratio, into the best-fitting grid of ``rows x cols`` encoder-sized tiles
(:func:`select_best_resolution` over the allowed grids), padded black to the grid, cut into
tiles, and preceded by an overview: the whole image resized to one tile. Each tile gives a
``side x side`` grid of visual tokens; the tiles' tokens are laid out as one
``rows*side x cols*side`` map, the rows and columns that show only padding are removed
(:func:`unpadded_shape`), and each remaining row may end with a learned newline token. The
count of an image's tokens is therefore a function of its size, computed here before the
model sees it (:meth:`TileLayout.num_tokens`); the model arranges the features the same way
(``vlm.modeling.tiling``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import functional as TF

from vlm.core.errors import ConfigError, ImageLoadError
from vlm.data.image_transforms import pad_to_square
from vlm.data.images import to_rgb

# the fields of a layout, in the order of its row in a batch's ``image_layouts`` tensor
LAYOUT_FIELDS = ("height", "width", "rows", "cols", "side", "newline", "lead")
# how a sample with several images lays them out: each tiled, or each its overview alone (OneVision)
MULTI_IMAGE = ("tiled", "base")


@dataclass(frozen=True)
class TileLayout:
    """How one image becomes visual tokens: its size in pixels, its tile grid (``rows x cols``;
    ``0 x 0``: the overview alone), each tile's token grid side after pooling, whether rows
    end with a newline token and ``lead``, each tile's tokens that are not grid cells (a
    connector's global or question token: :meth:`Connector.lead_tokens`), which go in front of
    the image's tokens, tile by tile."""

    height: int
    width: int
    rows: int
    cols: int
    side: int
    newline: bool
    lead: int = 0

    @property
    def num_tiles(self) -> int:
        """Encoder inputs: the overview and the grid's tiles."""
        return 1 + self.rows * self.cols

    def unpadded(self) -> Tuple[int, int]:
        """``(rows, cols)`` of the grid's token map once the padding's rows or columns are removed."""
        return unpadded_shape(self.height, self.width, self.rows * self.side, self.cols * self.side)

    def num_tokens(self) -> int:
        """Visual tokens of the image: every tile's ``lead`` tokens, the overview's ``side**2``,
        then the unpadded grid map with one newline per row (the overview alone: one newline
        after it)."""
        base = self.num_tiles * self.lead + self.side * self.side
        if not self.rows:
            return base + int(self.newline)
        h, w = self.unpadded()
        return base + h * w + (h if self.newline else 0)

    def as_row(self) -> List[int]:
        """The layout as integers (a row of ``Batch.image_layouts``, fields as :data:`LAYOUT_FIELDS`)."""
        return [self.height, self.width, self.rows, self.cols, self.side, int(self.newline), self.lead]

    @classmethod
    def from_row(cls, row: Sequence[int]) -> "TileLayout":
        """The layout of one row of ``Batch.image_layouts``."""
        height, width, rows, cols, side, newline, lead = (int(v) for v in row)
        return cls(height, width, rows, cols, side, bool(newline), lead)


def unpadded_shape(height: int, width: int, map_height: int, map_width: int) -> Tuple[int, int]:
    """The part of a ``map_height x map_width`` token map that shows an ``height x width`` image
    resized into it with its aspect ratio kept and centred: the padding's rows (or columns) are
    cut equally from both sides (LLaVA-NeXT's ``unpad_image``, rounding included)."""
    if width / height > map_width / map_height:
        new_height = int(round(height * (map_width / width), 7))
        return map_height - 2 * ((map_height - new_height) // 2), map_width
    new_width = int(round(width * (map_height / height), 7))
    return map_height, map_width - 2 * ((map_width - new_width) // 2)


def select_best_resolution(height: int, width: int, candidates: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """The ``(height, width)`` among ``candidates`` that shows an ``height x width`` image with
    the most of its pixels once resized to fit (aspect kept, never above its own count), ties to
    the least wasted area."""
    best, best_effective, best_wasted = None, -1, math.inf
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(cand_h), int(cand_w)), effective, wasted
    if best is None:
        raise ValueError("select_best_resolution needs at least one candidate resolution")
    return best


def grids_up_to(max_tiles: int, image_size: int) -> List[List[int]]:
    """Every grid of at most ``max_tiles`` tiles as ``[height, width]`` pixel sizes."""
    return [[r * image_size, c * image_size] for r in range(1, max_tiles + 1)
            for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def pooled_side(grid: int, stride: int) -> int:
    """A tile's token grid side after bilinear pooling with ``stride`` (OneVision's ``ceil``)."""
    return math.ceil(grid / stride)


@dataclass(frozen=True)
class TilingSpec:
    """What tiling needs of the model: the encoder's input side ``image_size``, the token grid
    side of one tile before pooling ``grid``, the allowed grids ``pinpoints`` (pixel sizes),
    ``newline``, the default ``pool_stride``, the pixel normalisation, how the images of a
    multi-image sample are laid out (``multi_image``: ``tiled`` or ``base``, the overview alone)
    and ``lead``, each tile's tokens in front of its grid (:class:`TileLayout`)."""

    image_size: int
    grid: int
    pinpoints: Tuple[Tuple[int, int], ...]
    newline: bool = True
    pool_stride: int = 1
    mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    multi_image: str = "tiled"
    lead: int = 0

    @property
    def square_overview(self) -> bool:
        """Whether an image shown as its overview alone is padded to a square first (``base``:
        LLaVA-OneVision's multi-image pixels; the tiled overview is always a plain resize)."""
        return self.multi_image == "base"

    @classmethod
    def from_config(cls, tiling, image_size: int, grid: int, mean: Sequence[float], std: Sequence[float],
                    where: str = "model.vision.tiling", lead: int = 0) -> "TilingSpec":
        """The spec of a ``model.vision.tiling`` section for an encoder of input side
        ``image_size`` whose tiles give ``lead`` tokens and a ``grid x grid`` map; ConfigError
        naming the field for a grid the encoder cannot take."""
        check_tiling(tiling, image_size, where)
        pinpoints = tiling.grid_pinpoints if tiling.grid_pinpoints is not None else grids_up_to(
            int(tiling.max_tiles), image_size)
        return cls(image_size, grid, tuple((int(h), int(w)) for h, w in pinpoints), bool(tiling.newline),
                   int(tiling.pool_stride), tuple(mean), tuple(std), str(tiling.multi_image), int(lead))

    def layout(self, height: int, width: int, max_tiles: Optional[int] = None,
               pool_stride: Optional[int] = None) -> TileLayout:
        """The layout of an ``height x width`` image: the best grid among the pinpoints (of at
        most ``max_tiles`` tiles when given; 0: the overview alone), pooled by ``pool_stride``
        (default: the spec's)."""
        side = pooled_side(self.grid, pool_stride or self.pool_stride)
        candidates = [p for p in self.pinpoints
                      if max_tiles is None or (p[0] // self.image_size) * (p[1] // self.image_size) <= max_tiles]
        if not candidates:
            return TileLayout(height, width, 0, 0, side, self.newline, self.lead)
        best_h, best_w = select_best_resolution(height, width, candidates)
        return TileLayout(height, width, best_h // self.image_size, best_w // self.image_size, side, self.newline,
                          self.lead)


def check_tiling(tiling, image_size: int, where: str = "model.vision.tiling") -> None:
    """ConfigError naming the field of a tiling section the encoder (input side ``image_size``)
    cannot take: neither or both of ``grid_pinpoints`` / ``max_tiles``, a grid that is not a
    multiple of the encoder's size, a stride below 1."""
    pinpoints, max_tiles = tiling.grid_pinpoints, tiling.max_tiles
    if (pinpoints is None) == (max_tiles is None):
        raise ConfigError(f"{where}: set exactly one of grid_pinpoints or max_tiles")
    if max_tiles is not None and int(max_tiles) < 1:
        raise ConfigError(f"{where}.max_tiles = {max_tiles}: must be >= 1")
    check_multi_image(tiling.multi_image, f"{where}.multi_image")
    if int(tiling.pool_stride) < 1:
        raise ConfigError(f"{where}.pool_stride = {tiling.pool_stride}: must be >= 1")
    if pinpoints is not None:
        if not len(pinpoints):
            raise ConfigError(f"{where}.grid_pinpoints: empty; give [height, width] pixel sizes")
        for i, point in enumerate(pinpoints):
            if len(point) != 2 or any(int(v) < image_size or int(v) % image_size for v in point):
                raise ConfigError(f"{where}.grid_pinpoints.{i} = {list(point)}: each side must be a positive "
                                  f"multiple of the encoder's image size {image_size}")


def check_multi_image(value: str, where: str = "model.vision.tiling.multi_image") -> None:
    """ConfigError naming ``where`` for a ``multi_image`` that is not one of :data:`MULTI_IMAGE`."""
    if value not in MULTI_IMAGE:
        raise ConfigError(f"{where} = {value!r}: must be one of {', '.join(MULTI_IMAGE)}")


def image_size_of(path: "str | Image.Image") -> Tuple[int, int]:
    """``(height, width)`` of an image (a path: read from its header, no decoding), as the
    loader sees it (EXIF orientation applied); ImageLoadError naming the file."""
    if isinstance(path, Image.Image):
        return path.height, path.width
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc
    return _file_size(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=1 << 16)
def _file_size(path: str, mtime_ns: int, size: int) -> Tuple[int, int]:
    """:func:`image_size_of` for a file, read once per version of it (samples share images; a PNG's
    EXIF may sit after its pixel data, so reading it costs milliseconds)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as exc:  # an unreadable or missing file
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def tile_pixels(image: Image.Image, layout: TileLayout, spec: TilingSpec, square: bool = False) -> torch.Tensor:
    """``(num_tiles, 3, S, S)`` normalised pixels: the overview (the image resized to ``S x S``;
    ``square``: first padded to a square in the mean colour, LLaVA's ``expand2square``), then
    the grid's tiles row by row (the image resized into the grid with its aspect ratio kept,
    centred on black, as LLaVA-NeXT's processor does). Bicubic throughout."""
    image = to_rgb(image)
    size = spec.image_size
    if square:
        tiles = [pad_to_square(size, spec.mean, spec.std)(image)]
    else:
        tiles = [image.resize((size, size), Image.BICUBIC)]
    if layout.rows:
        grid_h, grid_w = layout.rows * size, layout.cols * size
        new_h, new_w = _fit_size(layout.height, layout.width, grid_h, grid_w)
        canvas = Image.new("RGB", (grid_w, grid_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((grid_w - new_w) // 2, (grid_h - new_h) // 2))
        tiles += [canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                  for r in range(layout.rows) for c in range(layout.cols)]
    return torch.stack([tile if isinstance(tile, torch.Tensor) else TF.normalize(TF.to_tensor(tile), list(spec.mean),
                                                                                  list(spec.std)) for tile in tiles])


def _fit_size(height: int, width: int, grid_h: int, grid_w: int) -> Tuple[int, int]:
    """The size of an ``height x width`` image scaled to fit ``grid_h x grid_w`` (aspect kept)."""
    scale_w, scale_h = grid_w / width, grid_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), grid_h), grid_w
    return grid_h, min(math.ceil(width * scale_h), grid_w)
