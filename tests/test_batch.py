"""The one batch type and its one collate: padding on either side, packing (every sample's
tokens kept, labels fenced, position ids restarting), dropped samples counted, the images'
kind carried to the model's arguments, and ``to`` moving a copy."""

from __future__ import annotations

import pytest
import torch

from vlm.core.errors import ImageLoadError
from vlm.data.batch import Batch, Collator, EncodedSample
from vlm.data.images import unless_unreadable
from vlm.data.processor import IGNORE_INDEX
from vlm.data.types import Sample, Turn

PAD = 0


def item(ids, labels=None, images=0, kind="pixels"):
    shape = (3, 4, 4) if kind == "pixels" else (5, 8)
    pictures = [torch.full(shape, float(ids[0] * 10 + k)) for k in range(images)]
    return EncodedSample(list(ids), list(labels if labels is not None else ids), pictures,
                         [f"about {ids[0]} #{k}" for k in range(images)], kind)


ITEMS = [item([1, 2, 3], [-100, 2, 3], images=1), item([4, 5], [-100, 5]),
         item([6, 7, 8, 9], [-100, -100, 8, 9], images=2)]


def test_right_padding():
    batch = Collator(PAD)(ITEMS)
    assert batch.input_ids.tolist() == [[1, 2, 3, PAD], [4, 5, PAD, PAD], [6, 7, 8, 9]]
    assert batch.labels.tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100], [-100, -100, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.position_ids is None and not batch.packed
    assert (batch.num_samples, batch.skipped) == (3, 0)
    # images in sample order, one instruction each
    assert batch.images.shape == (3, 3, 4, 4) and batch.images[:, 0, 0, 0].tolist() == [10, 60, 61]
    assert batch.instructions == ["about 1 #0", "about 6 #0", "about 6 #1"]


def test_left_padding():
    batch = Collator(PAD, padding_side="left")(ITEMS)
    assert batch.input_ids.tolist() == [[PAD, 1, 2, 3], [PAD, PAD, 4, 5], [6, 7, 8, 9]]
    assert batch.labels.tolist() == [[-100, -100, 2, 3], [-100, -100, -100, 5], [-100, -100, 8, 9]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]]


def test_packing_keeps_every_sample_fences_labels_and_restarts_positions():
    items = [item([1, 2, 3]), item([4, 5], images=1), item([6, 7, 8, 9], images=1), item([10])]
    batch = Collator(PAD, packing=True, max_length=100)(items)
    # capacity 4 (the longest sample), first fit decreasing: [6 7 8 9], [1 2 3 | 10], [4 5]
    assert batch.input_ids.tolist() == [[6, 7, 8, 9], [1, 2, 3, 10], [4, 5, PAD, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1]]
    # each sample's first label fenced off (10's is its only one), padding unlabelled
    assert batch.labels.tolist() == [[-100, 7, 8, 9], [-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert batch.attention_mask is None and batch.packed
    assert (batch.num_samples, batch.skipped) == (4, 0)
    # every sample's tokens, once
    real = batch.input_ids[batch.input_ids != PAD].tolist()
    assert sorted(real) == list(range(1, 11))
    # images in row-major placeholder order
    assert batch.images[:, 0, 0, 0].tolist() == [60, 40]
    assert batch.instructions == ["about 6 #0", "about 4 #0"]
    inputs = batch.model_inputs()
    assert torch.equal(inputs["position_ids"], batch.position_ids) and inputs["attention_mask"] is None


def test_packed_rows_are_as_wide_as_the_longest_sample_and_at_most_max_length():
    items = [item([1, 2, 3]), item([4]), item([5, 6])]
    batch = Collator(PAD, packing=True, max_length=100)(items)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]] and batch.num_samples == 3
    with pytest.raises(ValueError, match="does not fit"):
        Collator(PAD, packing=True, max_length=2)(items)
    with pytest.raises(ValueError, match="padded on the right"):
        Collator(PAD, padding_side="left", packing=True)


def test_none_items_are_dropped_and_counted():
    for packing in (False, True):
        batch = Collator(PAD, packing=packing)([None, ITEMS[0], None, ITEMS[1]])
        assert (batch.num_samples, batch.skipped) == (2, 2)
    empty = Collator(PAD)([None, None])
    assert (empty.num_samples, empty.skipped) == (0, 2) and empty.images is None
    assert empty.input_ids.shape[0] == 0


def test_the_image_kind_picks_the_forward_argument():
    pixels = Collator(PAD)(ITEMS)
    assert pixels.model_inputs()["pixel_values"] is pixels.images and "image_features" not in pixels.model_inputs()
    features = Collator(PAD)([item([1, 2], images=1, kind="features"), item([3])])
    assert features.image_kind == "features" and features.images.shape == (1, 5, 8)
    inputs = features.model_inputs(with_labels=False)
    assert inputs["image_features"] is features.images and "pixel_values" not in inputs and "labels" not in inputs
    text_only = Collator(PAD)([item([1, 2])])
    assert text_only.images is None and text_only.model_inputs()["pixel_values"] is None
    with pytest.raises(ValueError, match="mixes"):
        Collator(PAD)([item([1], images=1), item([2], images=1, kind="features")])
    with pytest.raises(ValueError, match="image_kind"):
        Batch(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), image_kind="pixel")


def test_to_returns_a_moved_copy():
    batch = Collator(PAD, packing=True)([item([1, 2, 3], images=1), item([4])])
    moved = batch.to(torch.device("meta"))
    assert moved is not batch
    for name in ("input_ids", "labels", "position_ids", "images"):
        assert getattr(moved, name).device.type == "meta" and getattr(batch, name).device.type == "cpu", name
    assert moved.attention_mask is None
    assert (moved.num_samples, moved.skipped, moved.instructions, moved.image_kind) == \
        (batch.num_samples, batch.skipped, batch.instructions, batch.image_kind)
    back = batch.to("cpu", non_blocking=True)
    assert torch.equal(back.input_ids, batch.input_ids) and torch.equal(back.images, batch.images)


def test_accelerate_moves_a_batch_with_its_to():
    from accelerate.utils import send_to_device

    batch = Collator(PAD)(ITEMS)
    moved = send_to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and moved.input_ids.device.type == "meta" and moved.num_samples == 3


def test_a_batch_built_by_hand_counts_one_sample_per_row():
    batch = Batch(torch.zeros(5, 2, dtype=torch.long), torch.full((5, 2), IGNORE_INDEX))
    assert batch.num_samples == 5 and batch.skipped == 0 and batch.images is None


def test_an_unreadable_image_is_skipped_with_a_warning_or_raised(caplog):
    sample = Sample("s1", [Turn("user", "<image>\nhi")], ["x.png"], {"source": "data.json:3"})

    def fail():
        raise ImageLoadError("cannot load image x.png: broken")

    assert unless_unreadable(lambda: 7, sample) == 7
    with caplog.at_level("WARNING"):
        assert unless_unreadable(fail, sample, where="train") is None
    assert "train: skipping sample data.json:3: cannot load image x.png" in caplog.text
    with pytest.raises(ImageLoadError):
        unless_unreadable(fail, sample, skip=False)
