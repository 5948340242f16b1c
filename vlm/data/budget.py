"""The visual-token budget of a sample: fewer tiles, more pooling, fewer frames, else refused.

``stages.<name>.max_visual_tokens`` caps the visual tokens of one sample (all its images). A
sample over it is reduced in this order, each step taken only while the sample is still over
(docs/resolution.md):

1. fewer tiles: the image with the most tiles (the first of equals) moves to its best grid with
   fewer tiles, down to the smallest grid the pinpoints allow;
2. more pooling: every image's tiles are pooled with the next stride (2, 3, ...), until each
   tile is a single token;
3. fewer frames (a sample with videos; its images are fitted first, by steps 1 and 2 on their
   own, and the frames take what remains): the video with the most sampled frames (the first of
   equals) gives up one frame at a time, its frames spread evenly over the clip again, down to
   one frame per video;
4. refused: :class:`OverBudget`, one line with the sample's tokens at its smallest and the budget;
   a dataset leaves the sample out and counts it (``over_visual_budget``).

Without tiling an image's count is fixed, so only steps 3 (videos) and 4 apply.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from vlm.core.errors import DataFormatError
from vlm.data.anyres import TileLayout, TilingSpec, pooled_side


class OverBudget(DataFormatError):
    """A sample whose visual tokens cannot be brought within ``max_visual_tokens``."""


def _total(layouts: Sequence[TileLayout]) -> int:
    return sum(layout.num_tokens() for layout in layouts)


def fit_layouts(sizes: Sequence[Tuple[int, int]], spec: TilingSpec, budget: Optional[int],
                where: str = "sample") -> List[TileLayout]:
    """The layouts of images of ``sizes`` (``(height, width)``) within ``budget`` visual tokens
    (None: no budget), reduced in the module's order; OverBudget naming ``where`` when even the
    smallest layouts exceed it."""
    # a multi-image sample of a ``base`` model shows each image as its overview alone
    base_only = spec.multi_image == "base" and len(sizes) > 1
    layouts = [spec.layout(h, w, max_tiles=0 if base_only else None) for h, w in sizes]
    if budget is None or _total(layouts) <= budget:
        return layouts
    smallest = min((p[0] // spec.image_size) * (p[1] // spec.image_size) for p in spec.pinpoints)
    while _total(layouts) > budget:  # 1. fewer tiles
        index = max(range(len(layouts)), key=lambda i: (layouts[i].rows * layouts[i].cols, -i))
        tiles = layouts[index].rows * layouts[index].cols
        if tiles <= smallest:
            break
        layouts[index] = spec.layout(*sizes[index], max_tiles=tiles - 1)
    stride = spec.pool_stride
    while _total(layouts) > budget and pooled_side(spec.grid, stride) > 1:  # 2. more pooling
        stride += 1
        layouts = [replace(layout, side=pooled_side(spec.grid, stride)) for layout in layouts]
    if _total(layouts) > budget:
        raise OverBudget(f"{where}: {len(sizes)} image(s) need at least {_total(layouts)} visual tokens "
                         f"(fewest tiles, each tile one token), more than max_visual_tokens {budget}")
    return layouts


def fit_frames(image_tokens: int, frame_counts: Sequence[int], tokens_per_frame: int, budget: Optional[int],
               where: str = "sample", per_video: int = 0) -> List[int]:
    """Each video's frame count within ``budget`` visual tokens, beside ``image_tokens`` of the
    sample's images and ``per_video`` tokens each video adds (a trailing newline) (step 3);
    OverBudget naming ``where`` when one frame per video is still over."""
    counts = list(frame_counts)
    image_tokens += per_video * len(counts)
    if budget is None:
        return counts
    while image_tokens + tokens_per_frame * sum(counts) > budget:
        index = max(range(len(counts)), key=lambda i: (counts[i], -i))
        if not counts or counts[index] <= 1:
            raise OverBudget(f"{where}: {len(counts)} video(s) at one frame each ({tokens_per_frame} visual tokens "
                             f"a frame) and images of {image_tokens} tokens need {image_tokens + tokens_per_frame * len(counts)}, "
                             f"more than max_visual_tokens {budget}")
        counts[index] -= 1
    return counts


def check_fixed_budget(counts: Sequence[int], budget: Optional[int], where: str = "sample") -> None:
    """OverBudget naming ``where`` when images of fixed token ``counts`` (no tiling) exceed ``budget``."""
    if budget is not None and sum(counts) > budget:
        raise OverBudget(f"{where}: {len(counts)} image(s) of {counts[0] if counts else 0} visual tokens each "
                         f"= {sum(counts)}, more than max_visual_tokens {budget} (without tiling an image "
                         "cannot be reduced)")
