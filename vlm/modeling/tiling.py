"""AnyRes tiling, model side: tiles' visual tokens pooled, laid out, unpadded, newline-ended.

The processor (``vlm.data.anyres``) sends each image as its overview and grid tiles, with its
:class:`~vlm.data.anyres.TileLayout`. Every tile runs through the same encoder and connector;
here each image's tokens are put back together as LLaVA-NeXT's ``pack_image_features`` does:
every tile's lead tokens first (a connector's tokens outside its grid, e.g. a question token;
LLaVA-NeXT has none), the overview's tokens, then the tiles' token grids joined into one map,
cropped to the image's aspect ratio, each row followed by the learned ``image_newline`` (kept
on the connector, so it trains and saves with it). ``pool_stride`` > 1 first pools every
tile's grid bilinearly (LLaVA-OneVision's pooling). A video frame is an overview alone, pooled to the video's tokens
per frame; the last frame of a video may end with the newline (``model.video.newline``).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlm.core.errors import ConfigError
from vlm.data.anyres import TileLayout, TilingSpec

NEWLINE = "image_newline"  # the connector parameter that holds the row-end token


def tile_grid(vision: nn.Module, connector: nn.Module, where: str = "model.vision.tiling") -> int:
    """The side of one tile's square token grid (what the connector makes of the encoder's
    patches, after its lead tokens); ConfigError naming ``where`` when the tokens are not a
    square spatial grid."""
    side = connector.token_grid(vision.num_patches)
    if side is None:
        raise ConfigError(f"{where}: tiling lays each tile's tokens out as a square grid; connector "
                          f"{type(connector).__name__} gives {connector.num_tokens(vision.num_patches)} tokens that "
                          "are not one (keep_cls or queries)")
    return side


def prepare_tiling(vision: nn.Module, connector: nn.Module, llm_dim: int, tiling,
                   where: str = "model.vision.tiling") -> TilingSpec:
    """Check that the model can tile (:func:`tile_grid`, the grid sizes) and, with ``newline``,
    give the connector its learned row-end token; returns the model's tiling spec."""
    side = tile_grid(vision, connector, where)
    spec = TilingSpec.from_config(tiling, vision.image_size, side, vision.mean, vision.std, where,
                                  lead=connector.lead_tokens(vision.num_patches))
    if tiling.newline and getattr(connector, NEWLINE, None) is None:
        # LLaVA-NeXT's initialisation: a random vector at the scale of the token embeddings
        connector.register_parameter(NEWLINE, nn.Parameter(torch.randn(llm_dim) / math.sqrt(llm_dim)))
    return spec


def check_video_newline(tiles_newline: bool, where: str = "model.video.newline") -> None:
    """ConfigError naming ``where`` unless the model tiles with ``newline`` (``tiles_newline``):
    the video's closing newline is the tiles' learned ``image_newline``."""
    if not tiles_newline:
        raise ConfigError(f"{where}: true needs model.vision.tiling with newline: true (the video's closing "
                          "token is the tiles' learned image_newline)")


def row_end_token(connector: nn.Module, spec: Optional[TilingSpec]) -> Optional[torch.Tensor]:
    """The connector's learned row-end token when the model tiles with ``newline``, else None."""
    return getattr(connector, NEWLINE) if spec is not None and spec.newline else None


def pool_tiles(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """``(T, g*g, D)`` tile tokens -> ``(T, side*side, D)`` by bilinear interpolation of each grid."""
    grid = math.isqrt(tokens.shape[1])
    if side == grid:
        return tokens
    maps = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid, grid)
    pooled = F.interpolate(maps, size=(side, side), mode="bilinear")
    return pooled.flatten(2).transpose(1, 2)


def pack_image(tokens: torch.Tensor, layout: TileLayout, newline: Optional[torch.Tensor]) -> torch.Tensor:
    """One image's tile tokens ``(num_tiles, lead + g*g, D)`` (overview first) -> its visual
    tokens ``(layout.num_tokens(), D)``."""
    lead = tokens[:, :layout.lead].reshape(-1, tokens.shape[-1])
    tokens = pool_tiles(tokens[:, layout.lead:], layout.side)
    side, dim = layout.side, tokens.shape[-1]
    if layout.newline and newline is None:
        raise ValueError("the layout ends rows with a newline token but the connector has no image_newline")
    base = tokens[0]
    if not layout.rows:
        parts = [lead, base] + ([newline[None].to(base)] if layout.newline else [])
        return torch.cat(parts)
    grid = tokens[1:].reshape(layout.rows, layout.cols, side, side, dim)
    grid = grid.permute(4, 0, 2, 1, 3).reshape(dim, layout.rows * side, layout.cols * side)
    height, width = layout.unpadded()
    top = (grid.shape[1] - height) // 2
    left = (grid.shape[2] - width) // 2
    grid = grid[:, top:top + height, left:left + width]
    if layout.newline:
        grid = torch.cat([grid, newline[:, None, None].to(grid).expand(dim, height, 1)], dim=2)
    return torch.cat([lead, base, grid.flatten(1).transpose(0, 1)])


def per_tile(instructions: Sequence[str], tiles: Sequence[int]) -> List[str]:
    """Each image's instruction repeated for every one of its ``tiles`` (overview included): what
    a question-aware connector reads for each tile."""
    return [text for text, count in zip(instructions, tiles) for _ in range(count)]


def encode_tiled(encode, pixel_values: torch.Tensor, layouts: Sequence[TileLayout],
                 newline: Optional[torch.Tensor], instructions: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Every image's visual tokens, concatenated in order ``(sum of num_tokens, D)``:
    ``encode(pixels, instructions)`` (the model's encoder and connector) on all tiles at once,
    each image then packed by :func:`pack_image`."""
    counts = [layout.num_tiles for layout in layouts]
    if sum(counts) != pixel_values.shape[0]:
        raise ValueError(f"the image layouts need {sum(counts)} tiles; the batch has {pixel_values.shape[0]}")
    tokens = encode(pixel_values, None if instructions is None else per_tile(instructions, counts))
    out: List[torch.Tensor] = [pack_image(chunk, layout, newline)
                               for chunk, layout in zip(torch.split(tokens, counts), layouts)]
    return torch.cat(out)
