"""The visual-token budget (fewer tiles, then more pooling, else refused) and truncation that
never cuts inside an image's tokens."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model, tiny_model_config, write_images
from test_anyres import PINPOINTS, tiled_config

from vlm.data.anyres import LAYOUT_FIELDS, TilingSpec
from vlm.data.batch import Collator
from vlm.data.budget import OverBudget, fit_layouts
from vlm.data.dataset import ConversationDataset, whole_image_cut
from vlm.data.types import Sample, Turn
from vlm.modeling.processing import build_processor

SPEC = TilingSpec(32, 4, tuple(tuple(p) for p in PINPOINTS))
SIZES = [(64, 64), (37, 100)]  # (height, width): a 2 x 2 grid (88 tokens) and a 1 x 3 grid (60 tokens)


def shape(layouts):
    return [(layout.rows, layout.cols, layout.side) for layout in layouts]


@pytest.mark.parametrize("budget,expected", [
    (148, [(2, 2, 4), (1, 3, 4)]),  # fits: unchanged
    (120, [(1, 2, 4), (1, 3, 4)]),  # 1. the image with the most tiles loses tiles first
    (80, [(1, 2, 4), (1, 2, 4)]),   # 1. then the next one
    (50, [(1, 2, 2), (1, 2, 2)]),   # 2. smallest grids: pooled, stride 2
    (8, [(1, 2, 1), (1, 2, 1)]),    # 2. pooled down to one token per tile
])
def test_budget_takes_tiles_first_then_pools(budget, expected):
    layouts = fit_layouts(SIZES, SPEC, budget, where="a.json:3")
    assert shape(layouts) == expected
    assert sum(layout.num_tokens() for layout in layouts) <= budget


def test_a_sample_that_cannot_be_reduced_is_refused_naming_it():
    with pytest.raises(OverBudget, match=r"^a.json:3: 2 image\(s\) need at least 8 visual tokens .* "
                                         r"max_visual_tokens 7$"):
        fit_layouts(SIZES, SPEC, 7, where="a.json:3")


def sample(turns, images, source):
    return Sample(id=source, turns=list(turns), images=list(images), meta={"source": source})


TWO_IMAGES = [Turn("user", "<image>\nwhat color is the shape?"), Turn("assistant", "red"),
              Turn("user", "<image>\nand in this one?"), Turn("assistant", "a blue square")]


@pytest.fixture
def tiled(tmp_path, tokenizer_dir, tokenizer):
    cfg = tiled_config(tokenizer_dir)
    return build_tiny_model(cfg, tokenizer, seed=1), cfg, write_images(tmp_path / "img", [(64, 64), (100, 37)])


def test_over_budget_samples_are_left_out_counted_and_named(tiled, tokenizer, caplog, tmp_path, tokenizer_dir):
    model, cfg, paths = tiled
    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=7)
    one = sample(TWO_IMAGES[:2], paths[:1], "a.json:2")  # one 2 x 2 image: 4 tokens at the smallest
    two = sample(TWO_IMAGES, paths, "a.json:3")
    with caplog.at_level(logging.WARNING, logger="vlm.data.dataset"):
        dataset = ConversationDataset([one, two], processor, name="toy", progress=False)
    assert len(dataset) == 1 and dataset.stats["over_visual_budget"] == 1
    assert dataset.left_out == {"over_visual_budget": ["a.json:3"]}
    assert "a.json:3" in caplog.text and "max_visual_tokens 7" in caplog.text
    assert dataset[0].image_tokens == [dataset[0].input_ids.count(model.image_token_id)] == [4]
    # without tiling an image's count is fixed: the budget can only refuse
    plain_cfg = tiny_model_config(tokenizer_dir, template="chatml")
    plain = build_processor(build_tiny_model(plain_cfg, tokenizer), tokenizer, plain_cfg, max_visual_tokens=20)
    dataset = ConversationDataset([one, two], plain, name="toy", progress=False)
    assert dataset.left_out == {"over_visual_budget": ["a.json:3"]} and len(dataset) == 1


def test_a_datasets_own_budget_replaces_the_stages_for_its_samples(tiled, tokenizer, tmp_path):
    """``data.max_visual_tokens``: one source's samples get their own budget (here tighter: fewer
    tiles), the other source keeps the stage's."""
    import json

    from omegaconf import OmegaConf

    from vlm.config import DataConfig
    from vlm.data.formats import read_samples

    model, cfg, paths = tiled
    records = [{"id": "r", "image": paths[0], "conversations": [{"from": "human", "value": "<image>\nwhat?"},
                                                                 {"from": "gpt", "value": "red"}]}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    entries = [OmegaConf.structured(DataConfig(format="llava_json", args={"path": str(tmp_path / "a.json")},
                                               max_visual_tokens=budget)) for budget in (None, 30)]
    samples = read_samples(entries)
    assert [s.max_visual_tokens for s in samples] == [None, 30]
    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=100)
    dataset = ConversationDataset(samples, processor, name="toy", progress=False)
    stage_own, data_own = (sum(layout.num_tokens() for layout in layouts) for layouts in dataset.layouts)
    assert stage_own == 88 and data_own <= 30  # the 2 x 2 grid; fewer tiles for the tighter budget
    assert dataset[1].image_tokens == [data_own] == [dataset[1].input_ids.count(model.image_token_id)]


def runs(ids, token):
    """Lengths of the runs of ``token`` in ``ids``."""
    lengths, previous = [], None
    for t in ids:
        if t == token:
            if previous == token:
                lengths[-1] += 1
            else:
                lengths.append(1)
        previous = t
    return lengths


def test_truncation_never_cuts_inside_an_image(tiled, tokenizer):
    model, cfg, paths = tiled
    full = build_processor(model, tokenizer, cfg).encode(sample(TWO_IMAGES, paths, "a.json:3"))
    first, second = full.image_tokens
    image_id = model.image_token_id
    start_second = [i for i, t in enumerate(full.input_ids) if t == image_id][first]
    outcomes = set()
    for max_length in range(first, len(full.input_ids) + 1):
        processor = build_processor(model, tokenizer, cfg, max_length=max_length)
        dataset = ConversationDataset([sample(TWO_IMAGES, paths, "a.json:3")], processor, progress=False)
        if not len(dataset):
            # the first image does not fit (nothing before it to train on), or its answer was cut
            assert set(dataset.left_out) <= {"too_long", "fully_masked"}
            assert sum(dataset.left_out.values(), []) == ["a.json:3"]
            outcomes.add("left out")
            continue
        item = dataset[0]
        assert len(item.input_ids) <= max_length
        # every image kept whole, its tiles and layout with it; the images after the cut dropped
        assert runs(item.input_ids, image_id) == item.image_tokens == [first, second][:len(item.images)]
        assert [len(t) for t in item.images] == [layout.num_tiles for layout in item.image_layouts]
        if len(item.images) == 1:
            assert item.input_ids == full.input_ids[:min(start_second, max_length)]
            outcomes.add("after the first image")
        else:
            outcomes.add("both images")
    assert outcomes == {"left out", "after the first image", "both images"}


def test_a_truncated_sample_trains(tiled, tokenizer):
    model, cfg, paths = tiled
    full = build_processor(model, tokenizer, cfg).encode(sample(TWO_IMAGES, paths, "a.json:3"))
    start_second = [i for i, t in enumerate(full.input_ids) if t == model.image_token_id][full.image_tokens[0]]
    processor = build_processor(model, tokenizer, cfg, max_length=start_second + 3)  # inside the second image
    dataset = ConversationDataset([sample(TWO_IMAGES, paths, "a.json:3"), sample(TWO_IMAGES[:2], paths[1:], "b")],
                                  processor, progress=False)
    assert dataset.stats["truncated"] == 1 and len(dataset) == 2
    assert len(dataset[0].images) == 1
    batch = Collator(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch.image_layouts.shape == (2, len(LAYOUT_FIELDS))
    loss = model(**batch.model_inputs()).loss
    assert torch.isfinite(loss)


def test_whole_image_cut():
    ids = [1, 9, 9, 2, 9, 9, 9, 3, 4]
    assert whole_image_cut(ids, 9, [2, 3], 9) == (9, 2)
    assert whole_image_cut(ids, 9, [2, 3], 8) == (8, 2)
    assert whole_image_cut(ids, 9, [2, 3], 6) == (4, 1)  # the second image would be cut: cut before it
    assert whole_image_cut(ids, 9, [2, 3], 4) == (4, 1)
    assert whole_image_cut(ids, 9, [2, 3], 2) == (1, 0)
