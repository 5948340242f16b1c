"""The batch: one typed record from the DataLoader to the model, built by one :class:`Collator`.

A dataset item (``VLMProcessor.encode``, ``ConversationDataset``) is an :class:`EncodedSample`,
or None for a sample whose image could not be read. :class:`Collator` (a DataLoader
``collate_fn``) drops the None items, counts them in ``Batch.skipped``, and lays the rest out in
rows, padded (left or right, one sample per row) or packed (several samples per row, see
:mod:`vlm.data.packing`). Both layouts fill the tensors the same way (:func:`_lay_out`); they
differ only in which samples share a row and where a row's padding goes.

A :class:`Batch` is never changed on its way: ``to`` returns a moved copy (what accelerate's
DataLoader calls), ``model_inputs`` the keyword arguments of ``VisionLanguageModel.forward``,
and the bookkeeping (``num_samples``, ``skipped``) is read off its attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

import torch

from vlm.data.packing import first_fit_decreasing, row_capacity

IGNORE_INDEX = -100

# what a batch's (and a sample's) images are: transformed pixels ``(n, 3, S, S)``, or an
# encoder's cached features ``(n, N, Dv)`` (the frozen-feature cache, vlm.data.feature_cache)
ImageKind = Literal["pixels", "features"]
IMAGE_KINDS = ("pixels", "features")
# the forward argument each kind is passed as
_FORWARD_ARGUMENT = {"pixels": "pixel_values", "features": "image_features"}


def _check_kind(kind: str) -> None:
    if kind not in IMAGE_KINDS:
        raise ValueError(f"image_kind must be one of {IMAGE_KINDS}, got '{kind}'")


@dataclass
class EncodedSample:
    """One sample ready to batch: token ids, labels (-100 outside trained segments), its images in
    marker order (pixels, or cached features when ``image_kind`` is ``"features"``) and each
    image's instruction."""

    input_ids: List[int]
    labels: List[int]
    images: List[torch.Tensor] = field(default_factory=list)
    instructions: List[str] = field(default_factory=list)
    image_kind: ImageKind = "pixels"
    # each image's number of visual tokens (placeholders), in marker order; empty: K each
    image_tokens: List[int] = field(default_factory=list)
    # AnyRes tiling: each image's vlm.data.anyres.TileLayout (its ``images`` entry holds its tiles)
    image_layouts: Optional[List[Any]] = None
    # per image: whether it is a video frame (pooled by the model); empty: no frame
    frames: List[bool] = field(default_factory=list)

    def __post_init__(self):
        _check_kind(self.image_kind)


@dataclass
class Batch:
    """A batch of samples, padded or packed.

    - ``input_ids``, ``labels``: ``(rows, T)`` long tensors; labels -100 where nothing is trained
      (padding included).
    - ``attention_mask``: ``(rows, T)``, 1 on real tokens; None when packed.
    - ``position_ids``: ``(rows, T)``, restarting at 0 for every sample; set only when packed.
    - ``images``: every image of the batch in placeholder (row-major) order, pixels or cached
      encoder features as ``image_kind`` says; None when the batch holds no image.
    - ``instructions``: one per image, in the same order.
    - ``num_samples``: how many samples the batch holds (packed rows hold several; None given:
      one per row).
    - ``skipped``: how many samples the collate dropped (unreadable images).
    - ``num_tokens``: the real (non-padding) tokens of the batch (None given: the attention
      mask's ones, or every position when there is none).
    - ``image_layouts``: AnyRes tiling, ``(n_images, len(LAYOUT_FIELDS))`` long
      (``vlm.data.anyres.TileLayout`` rows); ``images`` then holds every image's tiles,
      ``(tiles, 3, S, S)``.
    - ``frames``: ``(n,)`` bool, which images are video frames; None when none is.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None
    image_kind: ImageKind = "pixels"
    instructions: List[str] = field(default_factory=list)
    num_samples: Optional[int] = None
    skipped: int = 0
    num_tokens: Optional[int] = None
    image_layouts: Optional[torch.Tensor] = None
    frames: Optional[torch.Tensor] = None

    def __post_init__(self):
        _check_kind(self.image_kind)
        if self.num_samples is None:
            self.num_samples = int(self.input_ids.shape[0])
        if self.num_tokens is None:
            mask = self.attention_mask
            self.num_tokens = int(mask.sum()) if mask is not None else int(self.input_ids.numel())

    @property
    def packed(self) -> bool:
        """Whether several samples may share a row (position ids instead of an attention mask)."""
        return self.position_ids is not None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (this batch is left as it is); accelerate's
        DataLoader (``send_to_device``) moves batches with it."""
        return self._map_tensors(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in pinned memory (what a DataLoader with ``pin_memory=True`` calls)."""
        return self._map_tensors(lambda tensor: tensor.pin_memory())

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        def apply(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else fn(tensor)

        return dataclasses.replace(
            self, input_ids=apply(self.input_ids), labels=apply(self.labels),
            attention_mask=apply(self.attention_mask), position_ids=apply(self.position_ids),
            images=apply(self.images), instructions=list(self.instructions),
            image_layouts=apply(self.image_layouts), frames=apply(self.frames))

    def model_inputs(self, with_labels: bool = True) -> Dict[str, Any]:
        """The keyword arguments of ``VisionLanguageModel.forward`` for this batch: ``input_ids``,
        ``attention_mask``, ``labels`` (unless ``with_labels`` is False), the images as
        ``pixel_values`` or ``image_features``, ``instructions`` and, when packed,
        ``position_ids``."""
        inputs: Dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                                  _FORWARD_ARGUMENT[self.image_kind]: self.images,
                                  "instructions": self.instructions}
        if with_labels:
            inputs["labels"] = self.labels
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.image_layouts is not None:
            inputs["image_layouts"] = self.image_layouts
        if self.frames is not None:
            inputs["frame_mask"] = self.frames
        return inputs


class Collator:
    """A DataLoader ``collate_fn``: encoded samples in, one :class:`Batch` out.

    ``None`` items (samples whose image could not be read) are dropped and counted in
    ``Batch.skipped``; this runs in the DataLoader's workers, so the count travels with the batch.
    The rest are padded with ``pad_id`` (labels with -100), one sample per row, on
    ``padding_side`` (``"left"`` for generation), or, with ``packing``, laid end to end in rows
    of at most :func:`~vlm.data.packing.row_capacity` tokens (capped at ``max_length``) as
    :func:`~vlm.data.packing.first_fit_decreasing` groups them: see :mod:`vlm.data.packing`.
    """

    def __init__(self, pad_id: int, padding_side: str = "right", packing: bool = False,
                 max_length: Optional[int] = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
        if packing and padding_side != "right":
            raise ValueError("packed rows are padded on the right (their padding is a sequence of its own)")
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.packing = packing
        self.max_length = max_length

    def __call__(self, items: Sequence[Optional[EncodedSample]]) -> Batch:
        kept = [item for item in items if item is not None]
        lengths = [len(item.input_ids) for item in kept]
        if self.packing:
            capacity = max(lengths, default=0) if self.max_length is None else row_capacity(lengths, self.max_length)
            rows = first_fit_decreasing(lengths, capacity)
        else:
            rows = [[i] for i in range(len(kept))]
        return _lay_out(kept, rows, self.pad_id, left=self.padding_side == "left", packed=self.packing,
                        skipped=len(items) - len(kept))


def _lay_out(items: Sequence[EncodedSample], rows: Sequence[Sequence[int]], pad_id: int, left: bool,
             packed: bool, skipped: int = 0) -> Batch:
    """The batch of ``items`` placed in ``rows`` (lists of item indices, laid end to end in that
    order), each row as wide as the widest and padded on the left or the right. Packed: labels
    fenced (:func:`_fence`), position ids restarting for every sample, no attention mask;
    otherwise an attention mask over the real tokens. ``skipped``: the samples dropped before."""
    kinds = {item.image_kind for item in items if item.images} or {item.image_kind for item in items[:1]}
    if len(kinds) > 1:
        raise ValueError("a batch mixes samples with pixels and samples with cached features")
    used = [sum(len(items[i].input_ids) for i in row) for row in rows]
    width = max(used, default=0)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long) if packed else None
    mask = None if packed else torch.zeros(shape, dtype=torch.long)
    images: List[torch.Tensor] = []
    instructions: List[str] = []
    layouts: List[List[int]] = []
    frames: List[bool] = []
    for r, row in enumerate(rows):
        start = width - used[r] if left else 0
        for i in row:
            item = items[i]
            span = slice(start, start + len(item.input_ids))
            ids[r, span] = torch.tensor(item.input_ids, dtype=torch.long)
            labels[r, span] = torch.tensor(_fence(item.labels) if packed else item.labels, dtype=torch.long)
            if packed:
                positions[r, span] = torch.arange(len(item.input_ids))
            else:
                mask[r, span] = 1
            images.extend(item.images)
            instructions.extend(item.instructions)
            layouts.extend(layout.as_row() for layout in item.image_layouts or [])
            frames.extend(item.frames or [False] * len(item.images))
            start = span.stop
        if packed:
            # padding is a sequence of its own (positions restart), so it never joins a sample's block
            positions[r, start:] = torch.arange(width - start)
    tiled = any(item.image_layouts for item in items)
    if tiled and not all(item.image_layouts is not None or not item.images for item in items):
        raise ValueError("a batch mixes tiled (AnyRes) and untiled images")
    return Batch(input_ids=ids, labels=labels, attention_mask=mask, position_ids=positions,
                 images=(torch.cat if tiled else torch.stack)(images) if images else None,
                 image_kind=kinds.pop() if kinds else "pixels", instructions=instructions,
                 num_samples=len(items), skipped=skipped, num_tokens=sum(used),
                 image_layouts=torch.tensor(layouts, dtype=torch.long) if tiled else None,
                 frames=torch.tensor(frames, dtype=torch.bool) if any(frames) else None)


def _fence(labels: Sequence[int]) -> List[int]:
    """A sample's labels with its first position unlabelled: in a packed row the shifted loss
    would otherwise predict it from the previous sample's last token. (Unpacked, position 0
    is never a target either.)"""
    return [IGNORE_INDEX, *labels[1:]] if labels else []
