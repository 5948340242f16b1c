"""Turn Samples into model inputs: template -> segments -> token ids, labels and pixels.

Each ``<image>`` in the text becomes K copies of the image placeholder id, K being what the
model's connector produces per image; with AnyRes tiling each image's own count, from its size
(``vlm.data.anyres``, within the sample's visual-token budget: ``vlm.data.budget``); each
``<video>`` becomes F x K_frame copies, for its F sampled frames and the K_frame pooled tokens of
a frame (:mod:`vlm.data.video`), plus one for the closing newline with ``video_newline``. Labels
are -100 everywhere but on the template's trainable segments, so they follow turn boundaries
exactly.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from vlm.core.errors import ImageLoadError
from vlm.data.anyres import TileLayout, TilingSpec, image_size_of, tile_pixels
from vlm.data.batch import IGNORE_INDEX, EncodedSample
from vlm.data.image_transforms import ImageTransform
from vlm.data.images import DEFAULT_MAX_PIXELS, open_image, to_rgb
from vlm.data.placement import check_placement, place_visuals
from vlm.data.templates import ChatTemplate
from vlm.data.types import IMAGE_TOKEN, VIDEO_TOKEN, Sample, Turn
from vlm.data.video import FrameSampling, probe, read_frames, video_name
from vlm.data.visuals import Visuals, load_visuals, marker_pattern


class VLMProcessor:
    """Tokenises conversations with a chat template and loads and transforms their images."""

    def __init__(
        self,
        tokenizer,
        template: ChatTemplate,
        image_transform: ImageTransform,
        num_image_tokens: int,
        image_token: str = IMAGE_TOKEN,
        max_length: int = 2048,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        tiling: Optional[TilingSpec] = None,
        max_visual_tokens: Optional[int] = None,
        num_frame_tokens: Optional[int] = None,
        frame_sampling: FrameSampling = FrameSampling(),
        image_placement: Optional[str] = None,
        video_newline: bool = False,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        template.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.tiling = tiling
        self.max_visual_tokens = max_visual_tokens
        self.num_frame_tokens = num_frame_tokens  # None: the model takes no video
        self.frame_sampling = frame_sampling
        if video_newline and tiling is None:
            raise ValueError("video_newline: the video's closing newline is the tiles' image_newline (needs tiling)")
        self.video_newline = video_newline  # one image_newline after a video's frames (OneVision)
        check_placement(image_placement)
        self.image_placement = image_placement  # None: positional
        self._markers = marker_pattern(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no '{image_token}' token; add it (vlm.modeling.llm.load_tokenizer)")

    def _encode_text(self, text: str, image_counts: Optional[Iterator[int]] = None,
                     frame_counts: Optional[Iterator[int]] = None) -> List[int]:
        ids: List[int] = []
        for piece in self._markers.split(text):
            if piece == self.image_token:
                count = self.num_image_tokens if image_counts is None else _next_count(image_counts)
                ids.extend([self.image_token_id] * count)
            elif piece == VIDEO_TOKEN:
                ids.extend([self.image_token_id] * self.video_tokens(next(frame_counts)))
            elif piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def video_tokens(self, frames: int) -> int:
        """Placeholders of a video of ``frames`` sampled frames: each frame's pooled tokens, and one
        newline after the last frame with ``video_newline``."""
        return self._frame_tokens() * frames + int(self.video_newline)

    def _frame_tokens(self) -> int:
        if self.num_frame_tokens is None:
            raise ValueError(f"this model takes no video ('{VIDEO_TOKEN}'): its visual tokens cannot be pooled")
        return self.num_frame_tokens

    def tokenize(self, turns: Sequence[Turn], add_generation_prompt: bool = False,
                 image_tokens: Optional[Sequence[int]] = None,
                 frame_counts: Sequence[int] = ()) -> Tuple[List[int], List[int]]:
        """``(input_ids, labels)`` for a conversation, labels -100 outside trained segments;
        ``image_tokens``: each ``<image>``'s count in marker order (default: K each);
        ``frame_counts``: the sampled frames of each ``<video>``, in order."""
        images = None if image_tokens is None else iter(image_tokens)
        frames = iter(frame_counts)
        input_ids: List[int] = []
        labels: List[int] = []
        bos = self.tokenizer.bos_token_id
        if self.template.add_bos and bos is not None:
            input_ids.append(bos)
            labels.append(IGNORE_INDEX)
        for segment in self.template.segments(turns, add_generation_prompt=add_generation_prompt):
            ids = self._encode_text(segment.text, images, frames)
            input_ids.extend(ids)
            if segment.trainable:
                labels.extend(IGNORE_INDEX if t == self.image_token_id else t for t in ids)
            else:
                labels.extend([IGNORE_INDEX] * len(ids))
        return input_ids, labels

    def prompt_turns(self, turns: Sequence[Turn]) -> List[Turn]:
        """The turns up to the last user turn, images placed as the model was trained
        (``image_placement``, :mod:`vlm.data.placement`): what a model is asked to answer."""
        turns = place_visuals(turns, self.image_placement, self.image_token)
        while turns and turns[-1].role == "assistant":
            turns.pop()
        if not turns or turns[-1].role != "user":
            raise ValueError("a generation prompt needs a user turn")
        return turns

    def budget_of(self, sample: Sample) -> Optional[int]:
        """The visual-token budget of ``sample``: its dataset's (``data.max_visual_tokens``), else
        the stage's (``max_visual_tokens``); None: no budget."""
        return self.max_visual_tokens if sample.max_visual_tokens is None else sample.max_visual_tokens

    def image_layouts(self, images: Sequence["str | Image.Image"], where: str = "sample",
                      budget: Optional[int] = None) -> Optional[List[TileLayout]]:
        """With tiling, each image's :class:`~vlm.data.anyres.TileLayout` from its size (read from
        the file's header), within ``budget`` (None: ``max_visual_tokens``; ``vlm.data.budget``:
        OverBudget naming ``where``); None without tiling (the budget still checked)."""
        from vlm.data.budget import check_fixed_budget, fit_layouts

        budget = self.max_visual_tokens if budget is None else budget
        if self.tiling is None:
            check_fixed_budget([self.num_image_tokens] * len(images), budget, where)
            return None
        return fit_layouts([image_size_of(image) for image in images], self.tiling, budget, where)

    def image_token_counts(self, layouts: Optional[Sequence[TileLayout]], num_images: int) -> List[int]:
        """Each image's number of visual tokens: its layout's, or K without tiling."""
        if layouts is None:
            return [self.num_image_tokens] * num_images
        return [layout.num_tokens() for layout in layouts]

    def load_tiles(self, path: "str | Image.Image", layout: TileLayout) -> torch.Tensor:
        """AnyRes: one image opened as :meth:`load_image` does, as its overview and tiles
        ``(num_tiles, 3, S, S)`` (:func:`vlm.data.anyres.tile_pixels`)."""
        image = to_rgb(path) if isinstance(path, Image.Image) else open_image(path, self.max_image_pixels)
        if (image.height, image.width) != (layout.height, layout.width):
            raise ImageLoadError(f"image {path}: {image.width} x {image.height} pixels, its layout was planned for "
                                 f"{layout.width} x {layout.height}")
        return tile_pixels(image, layout, self.tiling, square=self.tiling.square_overview and not layout.rows)

    def load_tiled_visuals(self, turns: Sequence[Turn], images: Sequence, videos: Sequence,
                           layouts: Sequence[TileLayout], frame_counts: Optional[Sequence[int]] = None
                           ) -> Tuple[Visuals, List[TileLayout]]:
        """AnyRes with videos: images (their ``layouts``, in order) and videos' sampled frames in
        marker order, and every entry's layout: a frame is its overview alone (resized to the
        encoder's size), pooled to the video's tokens per frame, the last one of a video ending
        with the newline when ``video_newline``. ``frame_counts``: each video's planned count."""
        planned, order = iter(layouts), []
        counts = iter(frame_counts) if frame_counts is not None else None
        lead = self.tiling.lead
        side = math.isqrt(self._frame_tokens() - lead)

        def load_image(path) -> torch.Tensor:
            order.append(next(planned))
            return self.load_tiles(path, order[-1])

        def load_video(source) -> List[torch.Tensor]:
            frames = self.sampled_frames(source, None if counts is None else next(counts))
            tiles = []
            for i, frame in enumerate(frames):
                last = i == len(frames) - 1
                order.append(TileLayout(frame.height, frame.width, 0, 0, side, self.video_newline and last, lead))
                tiles.append(tile_pixels(frame, order[-1], self.tiling))
            return tiles

        return load_visuals(turns, images, videos, self.image_token, load_image, load_video), order

    def load_image(self, path: "str | Image.Image") -> torch.Tensor:
        """Open (pixel limit, EXIF orientation: :func:`vlm.data.images.open_image`) and transform
        one image, given as a path or as a PIL image already in memory (converted to RGB by
        :func:`vlm.data.images.to_rgb`); ImageLoadError names the file on any failure."""
        image = to_rgb(path) if isinstance(path, Image.Image) else open_image(path, self.max_image_pixels)
        try:
            return self.image_transform(image)
        except Exception as exc:  # an odd mode or size the transform cannot take
            raise ImageLoadError(f"cannot load image {path}: {exc}") from exc

    def sampled_frames(self, source, num_frames: Optional[int] = None) -> List[Image.Image]:
        """The frames of a video (file, folder of frames or list of PIL frames) the model sees:
        as ``model.video`` samples them, or ``num_frames`` spread evenly when the budget lowered
        the count (:meth:`frame_counts`); ImageLoadError names the video on any failure."""
        sampling = self.frame_sampling
        if num_frames is not None:
            # spread by count, the planned count is the same frames as the model's own sampling
            # unless that samples by fps: only then does the clip need a look first
            if sampling.fps is None or num_frames != len(sampling.indices(*probe(source))):
                sampling = FrameSampling(num_frames=num_frames)
        return read_frames(source, sampling, self.max_image_pixels)

    def load_video(self, source, num_frames: Optional[int] = None) -> List[torch.Tensor]:
        """The :meth:`sampled_frames` of a video, each transformed as an image."""
        return [self.load_image(frame) for frame in self.sampled_frames(source, num_frames)]

    def frame_counts(self, sample: Sample, image_tokens: Optional[int] = None) -> List[int]:
        """How many frames each of ``sample``'s videos gives (from the container's header, or by
        counting), fewer where the sample's budget (:meth:`budget_of`) needs it beside its images'
        ``image_tokens`` (default: K each; ``vlm.data.budget.fit_frames``: OverBudget);
        ImageLoadError names an unreadable or empty video."""
        counts = []
        for video in sample.videos:
            total, rate = probe(video)
            count = len(self.frame_sampling.indices(total, rate))
            if not count:
                raise ImageLoadError(f"video {video_name(video)}: 0 frames")
            counts.append(count)
        if not counts:
            return counts
        from vlm.data.budget import fit_frames

        if image_tokens is None:
            image_tokens = self.num_image_tokens * len(sample.images)
        return fit_frames(image_tokens, counts, self._frame_tokens(), self.budget_of(sample),
                          sample.meta.get("source", sample.id), per_video=int(self.video_newline))

    def encode(self, sample: Sample, for_generation: bool = False) -> EncodedSample:
        """Token ids, labels, pixel tensors (images and video frames loaded here, in marker
        order), which of them are video frames, and each one's instruction for one sample;
        :class:`vlm.data.batch.Collator` batches them."""
        turns = self.prompt_turns(sample.turns) if for_generation else sample.turns
        if sample.videos and self.tiling is not None:
            layouts = self.image_layouts(sample.images, sample.meta.get("source", sample.id))
            visuals, order = self.load_tiled_visuals(turns, sample.images, sample.videos, layouts)
            input_ids, labels = self.tokenize(turns, add_generation_prompt=for_generation,
                                              image_tokens=self.image_token_counts(layouts, len(sample.images)),
                                              frame_counts=visuals.frame_counts)
            return EncodedSample(input_ids, labels, visuals.tensors, visuals.instructions, frames=visuals.frames,
                                 image_layouts=order)
        if sample.videos:
            visuals = load_visuals(turns, sample.images, sample.videos, self.image_token, self.load_image,
                                   self.load_video)
            input_ids, labels = self.tokenize(turns, add_generation_prompt=for_generation,
                                              frame_counts=visuals.frame_counts)
            return EncodedSample(input_ids, labels, visuals.tensors, visuals.instructions, frames=visuals.frames)
        layouts = self.image_layouts(sample.images, sample.meta.get("source", sample.id), self.budget_of(sample))
        counts = self.image_token_counts(layouts, len(sample.images))
        input_ids, labels = self.tokenize(turns, add_generation_prompt=for_generation, image_tokens=counts)
        if layouts is None:
            pixels = [self.load_image(p) for p in sample.images]
        else:
            pixels = [self.load_tiles(p, layout) for p, layout in zip(sample.images, layouts)]
        return EncodedSample(input_ids, labels, pixels, image_instructions(turns, self.image_token),
                             image_tokens=counts, image_layouts=layouts)


def _next_count(counts: Iterator[int]) -> int:
    count = next(counts, None)
    if count is None:
        raise ValueError("the text has more <image> markers than the sample has images")
    return count


def image_instructions(turns: Sequence[Turn], image_token: str = IMAGE_TOKEN) -> List[str]:
    """One instruction per ``image_token`` marker, in marker order: the text of the turn that
    holds it, markers removed (what an instruction-aware connector reads beside the image)."""
    instructions = []
    for turn in turns:
        count = turn.content.count(image_token)
        if count:
            instructions += [turn.content.replace(image_token, "").strip()] * count
    return instructions

