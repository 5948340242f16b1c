"""AnyRes tiling: parity with transformers' LlavaNext (processor and model), layouts, pooling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, tiny_model_config
from omegaconf import OmegaConf
from PIL import Image

from vlm.core.errors import ConfigError, DataFormatError, LayoutError
from vlm.data.anyres import TileLayout, select_best_resolution, unpadded_shape
from vlm.data.types import Sample, Turn
from vlm.interop.hf_llava_next import build_llava_next_processor, to_hf_llava_next
from vlm.modeling.processing import build_processor
from vlm.modeling.vision.base import pool_patch_grid

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# wide, tall, square, very wide, very tall, tiny: every grid and both unpad directions
SIZES = [(50, 30), (30, 75), (64, 64), (100, 37), (17, 90), (9, 7)]


def tiled_config(tokenizer_dir, **tiling):
    overrides = {"vision.tiling.enabled": True, "vision.tiling.grid_pinpoints": PINPOINTS, "template": "chatml"}
    overrides.update({f"vision.tiling.{k}": v for k, v in tiling.items()})
    return tiny_model_config(tokenizer_dir, **overrides)


def image(width, height, seed=0):
    rng = np.random.default_rng(seed + width * 1000 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def tiled(tokenizer_dir, tokenizer):
    cfg = tiled_config(tokenizer_dir)
    model = build_tiny_model(cfg, tokenizer, seed=3)
    return model, build_processor(model, tokenizer, cfg), cfg


def test_select_best_resolution_and_unpad_follow_llava_next():
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        assert select_best_resolution(h, w, PINPOINTS) == tuple(hf_select((h, w), PINPOINTS))
        rows, cols = (int(v) for v in rng.integers(1, 4, 2))
        grid = torch.zeros(1, rows * 4, cols * 4)
        assert unpadded_shape(h, w, rows * 4, cols * 4) == tuple(unpad_image(grid, (h, w)).shape[1:])


def test_ids_pixels_and_counts_equal_llava_next_processor(tiled, tokenizer):
    model, processor, cfg = tiled
    hf_processor = build_llava_next_processor(model, tokenizer, cfg)
    for width, height in SIZES:
        img = image(width, height)
        sample = Sample(id="s", turns=[Turn("user", "<image>\nwhat color is the shape?")], images=[img])
        encoded = processor.encode(sample, for_generation=True)
        text = hf_processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
            add_generation_prompt=True)
        ref = hf_processor(images=img, text=text, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == encoded.input_ids, (width, height)
        count = int((ref["input_ids"] == model.image_token_id).sum())
        assert encoded.image_tokens == [count] == [encoded.image_layouts[0].num_tokens()]
        assert ref["image_sizes"][0].tolist() == [height, width]
        torch.testing.assert_close(encoded.images[0], ref["pixel_values"][0][:encoded.images[0].shape[0]],
                                   atol=1e-5, rtol=0)


def test_features_and_logits_equal_llava_next(tiled, tokenizer):
    model, processor, cfg = tiled
    hf = to_hf_llava_next(model)
    from vlm.data.batch import Collator

    samples = [Sample(id=str(i), turns=[Turn("user", "<image>\ndescribe the image briefly."),
                                        Turn("assistant", "a small red circle")], images=[image(w, h)])
               for i, (w, h) in enumerate(SIZES[:4])]
    batch = Collator(tokenizer.pad_token_id, padding_side="left")([processor.encode(s) for s in samples])
    rows = batch.image_layouts.tolist()
    sizes = torch.tensor([[r[0], r[1]] for r in rows])
    tiles = [TileLayout.from_row(r).num_tiles for r in rows]
    padded = torch.zeros(len(rows), max(tiles), 3, 32, 32)
    for i, chunk in enumerate(torch.split(batch.images, tiles)):
        padded[i, :len(chunk)] = chunk
    with torch.no_grad():
        expected = hf.model.get_image_features(pixel_values=padded, image_sizes=sizes).pooler_output
        got = model.encode_tiled(batch.images, batch.image_layouts)
        torch.testing.assert_close(got, torch.cat(list(expected)), atol=1e-5, rtol=0)
        ref_logits = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=padded,
                        image_sizes=sizes).logits
        ours = model(**batch.model_inputs(with_labels=False)).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref_logits[real], atol=1e-5, rtol=0)


def test_pooling_and_no_newline_give_the_counted_tokens(tokenizer_dir, tokenizer):
    cfg = tiled_config(tokenizer_dir, pool_stride=3, newline=False)
    model = build_tiny_model(cfg, tokenizer)
    assert getattr(model.connector, "image_newline", None) is None
    processor = build_processor(model, tokenizer, cfg)
    for width, height in SIZES:
        encoded = processor.encode(Sample(id="s", turns=[Turn("user", "<image> hi")], images=[image(width, height)]))
        layout = encoded.image_layouts[0]
        assert layout.side == 2  # ceil(4 / 3)
        with torch.no_grad():
            tokens = model.encode_tiled(encoded.images[0], torch.tensor([layout.as_row()]))
        assert tokens.shape[0] == layout.num_tokens() == encoded.input_ids.count(model.image_token_id)


def test_llava_next_export_refuses_what_it_cannot_express(tokenizer_dir, tokenizer):
    for tiling, why in [({"pool_stride": 2}, "pool_stride = 2"), ({"newline": False}, "newline = false")]:
        model = build_tiny_model(tiled_config(tokenizer_dir, **tiling), tokenizer)
        with pytest.raises(LayoutError, match=why):
            to_hf_llava_next(model)
    with pytest.raises(LayoutError, match="tiling: not enabled"):
        to_hf_llava_next(build_tiny_model(tiny_model_config(tokenizer_dir), tokenizer))


@pytest.mark.parametrize("tiling,message", [
    ({"grid_pinpoints": [[32, 48]]}, r"grid_pinpoints.0 = \[32, 48\]: each side must be a positive multiple of "
                                     "the encoder's image size 32"),
    ({"grid_pinpoints": None}, "set exactly one of grid_pinpoints or max_tiles"),
    ({"max_tiles": 4}, "set exactly one of grid_pinpoints or max_tiles"),
    ({"pool_stride": 0}, "pool_stride = 0: must be >= 1"),
])
def test_a_tile_grid_the_encoder_cannot_take_is_one_line(tokenizer_dir, tokenizer, tiling, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_tiny_model(tiled_config(tokenizer_dir, **tiling), tokenizer)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("stage,message", [
    ({"objective": "simpo", "train": {"vision": "frozen", "connector": "frozen", "llm": "full"}},
     "stages.s.objective: 'simpo' reads one pixel tensor per image; with model.vision.tiling"),
    ({"feature_cache": True, "train": {"vision": "frozen", "connector": "full", "llm": "frozen"}},
     "stages.s.feature_cache: cached features are one encoder pass per image"),
])
def test_a_stage_that_needs_one_tensor_per_image_is_refused_with_tiling(tmp_path, tokenizer_dir, shapes_data,
                                                                        stage, message):
    from conftest import VISION_ARCH, run_config

    data = {"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"],
                                                "image_root": shapes_data["train"]["image_root"]}}
    vision = {"name": "hf_clip", "arch": dict(VISION_ARCH), "preprocess": "resize",
              "tiling": {"enabled": True, "max_tiles": 4}}
    with pytest.raises(ConfigError, match=message):
        run_config(tmp_path, tokenizer_dir, {"s": {**stage, "data": [data]}}, model={"vision": vision})
    run_config(tmp_path, tokenizer_dir, {"s": {**stage, "data": [data]}})  # untiled: accepted


def test_caption_bow_reads_the_max_over_each_images_overview_and_tiles(tiled, tokenizer):
    """The vision warm-up of a tiled recipe: each image's tiles are pooled on their own, then
    the head reads their element-wise max (a shape seen in one tile counts)."""
    from vlm.data.batch import Collator
    from vlm.training.objectives.warmup import CaptionBagOfWords

    model, processor, _ = tiled
    samples = [Sample(id=str(i), turns=[Turn("user", "<image>\n"), Turn("assistant", "a red circle " * (1 + i))],
                      images=[image(w, h)]) for i, (w, h) in enumerate(SIZES)]
    batch = Collator(pad_id=tokenizer.pad_token_id)([processor.encode(s) for s in samples])
    objective = CaptionBagOfWords(model, tokenizer)
    got = objective(model, batch).loss
    pooled, start = [], 0
    for layout in batch.image_layouts.tolist():
        tiles = 1 + layout[2] * layout[3]
        cells = pool_patch_grid(model.vision(batch.images[start:start + tiles]), 2)
        pooled.append(cells.permute(0, 2, 1).reshape(tiles, -1).max(dim=0).values)
        start += tiles
    assert start == batch.images.shape[0] and len(pooled) == len(SIZES)
    logits = objective.head(torch.stack(pooled))
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, objective.targets(batch.labels))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    two = Sample(id="two", turns=[Turn("user", "<image>\n<image>\n"), Turn("assistant", "two")],
                 images=[image(40, 40), image(50, 30)])
    with pytest.raises(DataFormatError, match="exactly one image per sample"):
        objective(model, Collator(pad_id=tokenizer.pad_token_id)([processor.encode(two)]))


def test_answer_words_reads_the_max_over_each_images_tiles_and_their_question_tokens(tokenizer_dir, tokenizer):
    """answer_words on tiled images: pooled features and the question-aware connector's question
    tokens (one per tile, each asking the image's question) are maxed over each image's tiles."""
    from vlm.data.batch import Collator
    from vlm.data.processor import IGNORE_INDEX
    from vlm.training.objectives.warmup import AnswerWords

    cfg = tiled_config(tokenizer_dir)
    OmegaConf.update(cfg, "connector.name", "question_aware_mlp", merge=False)
    model = build_tiny_model(cfg, tokenizer, seed=3)
    processor = build_processor(model, tokenizer, cfg)
    questions = ["is there a circle?", "what colour is it?", "where is it?"]
    samples = [Sample(id=str(i), turns=[Turn("user", f"<image>\n{q}"), Turn("assistant", "red" if i % 2 else "yes")],
                      images=[image(w, h)]) for i, ((w, h), q) in enumerate(zip(SIZES, questions * 2))]
    batch = Collator(pad_id=tokenizer.pad_token_id)([processor.encode(s) for s in samples])
    objective = AnswerWords(model, tokenizer)
    assert objective.asks_connector
    got = objective(model, batch).loss
    pooled, tokens, start = [], [], 0
    for layout, question in zip(batch.image_layouts.tolist(), batch.instructions):
        tiles = TileLayout.from_row(layout).num_tiles
        features = model.vision(batch.images[start:start + tiles])
        pooled.append(pool_patch_grid(features, objective.pool).transpose(1, 2).flatten(1).max(dim=0).values)
        tokens.append(model.connector.question_token(features, [question] * tiles).squeeze(1).max(dim=0).values)
        start += tiles
    assert start == batch.images.shape[0] and len(pooled) == len(SIZES)
    prompt = (batch.labels == IGNORE_INDEX) & (batch.input_ids != model.image_token_id) & batch.attention_mask.bool()
    answer = objective._bag(batch.labels.clamp(min=0), batch.labels != IGNORE_INDEX)
    logits = objective.logits(torch.stack(pooled), objective._bag(batch.input_ids, prompt), torch.stack(tokens))
    want = -(answer / answer.sum(1, keepdim=True) * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_packed_tiled_batch_gives_the_padded_loss(tiled, tokenizer):
    """Packing reorders samples into rows: each image's tiles and layout move with it."""
    from vlm.data.batch import Collator

    model, processor, _ = tiled
    samples = [Sample(id=str(i), turns=[Turn("user", "<image>\nwhat is it?"), Turn("assistant", "a red " * (1 + i))],
                      images=[image(w, h)]) for i, (w, h) in enumerate(SIZES)]
    samples.insert(2, Sample(id="text", turns=[Turn("user", "hello"), Turn("assistant", "hi there")], images=[]))
    items = [processor.encode(s) for s in samples]
    packed = Collator(tokenizer.pad_token_id, packing=True, max_length=1000)(items)
    padded = Collator(tokenizer.pad_token_id)(items)
    assert packed.input_ids.shape[0] < len(items)
    assert sorted(map(tuple, packed.image_layouts.tolist())) == sorted(map(tuple, padded.image_layouts.tolist()))
    with torch.no_grad():
        torch.testing.assert_close(model(**packed.model_inputs()).loss, model(**padded.model_inputs()).loss,
                                   atol=1e-5, rtol=0)


def test_image_size_of_reads_the_header_as_the_loader_sees_it(tmp_path):
    from vlm.core.errors import ImageLoadError
    from vlm.data.anyres import image_size_of

    path = tmp_path / "a.jpg"
    image(50, 30).save(path)
    assert image_size_of(str(path)) == (30, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the loader (exif_transpose) turns it upright
    image(40, 20).save(path, exif=exif)  # the same path, another file: read again
    assert image_size_of(str(path)) == (40, 20)
    from vlm.data.images import open_image

    assert open_image(str(path)).size == (20, 40)
    with pytest.raises(ImageLoadError, match="missing.png"):
        image_size_of(str(tmp_path / "missing.png"))


def test_serve_counts_a_tiled_images_tokens_against_the_context(tiled):
    """`vlm serve` refuses a prompt over the model's context counting each image's real tokens."""
    import base64
    import io
    from types import SimpleNamespace

    from vlm.inference.serving.app import _parse
    from vlm.inference.serving.requests import APIError

    model, processor, _ = tiled
    buffer = io.BytesIO()
    image(100, 37).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what is it?"}]}], "max_tokens": 4}
    expected = len(processor.encode(Sample(id="s", turns=[Turn("user", "<image>\nwhat is it?")], images=[image(100, 37)]),
                                    for_generation=True).input_ids)
    assert expected > 60  # a 1 x 3 grid: far more than the 16 tokens of an untiled image
    _, prompt = _parse(SimpleNamespace(processor=processor, context_length=expected + 4), body, None)
    assert prompt == expected
    with pytest.raises(APIError, match=f"{expected} in the messages"):
        _parse(SimpleNamespace(processor=processor, context_length=expected + 3), body, None)


def test_a_connector_whose_tokens_are_not_a_square_grid_cannot_tile(tokenizer_dir, tokenizer):
    cfg = tiled_config(tokenizer_dir)
    OmegaConf.update(cfg, "vision.keep_cls", True, merge=False)
    with pytest.raises(ConfigError, match=r"^model.vision.tiling: tiling lays each tile's tokens out as a square grid"):
        build_tiny_model(cfg, tokenizer)


@pytest.mark.parametrize("overrides,lead", [({"connector.options": {"global_token": True}}, 1),
                                            ({"connector.name": "question_aware_mlp"}, 1),
                                            ({"connector.name": "question_aware_mlp",
                                              "connector.options": {"global_token": True}}, 2)])
def test_a_connectors_lead_tokens_go_first_tile_by_tile(tokenizer_dir, tokenizer, overrides, lead):
    """A global or question token is no grid cell: each tile's go in front of the image's tokens,
    the grids are packed as without them, and the processor counts them."""
    from dataclasses import replace

    from vlm.data.batch import Collator
    from vlm.modeling.tiling import pack_image

    cfg = tiled_config(tokenizer_dir)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    model = build_tiny_model(cfg, tokenizer, seed=3)
    processor = build_processor(model, tokenizer, cfg)
    question = "what is it?"
    items = []
    for width, height in SIZES:
        items.append(processor.encode(Sample(id="s", turns=[Turn("user", f"<image>\n{question}"), Turn("assistant", "a")],
                                             images=[image(width, height)])))
        layout, tiles = items[-1].image_layouts[0], items[-1].images[0]
        assert layout.lead == lead
        with torch.no_grad():
            per_tile = model.encode_images(tiles, [question] * len(tiles))
            got = model.encode_tiled(tiles, torch.tensor([layout.as_row()]), [question])
        assert got.shape[0] == layout.num_tokens() == items[-1].input_ids.count(model.image_token_id)
        torch.testing.assert_close(got[:len(tiles) * lead], per_tile[:, :lead].flatten(0, 1))
        torch.testing.assert_close(got[len(tiles) * lead:],
                                   pack_image(per_tile[:, lead:], replace(layout, lead=0), model.connector.image_newline))
    batch = Collator(tokenizer.pad_token_id)(items)
    assert batch.image_layouts[:, -1].tolist() == [lead] * len(SIZES)
    with torch.no_grad():
        assert torch.isfinite(model(**batch.model_inputs()).loss)
    with pytest.raises(LayoutError, match="^model.connector: "):
        to_hf_llava_next(model)


def test_the_anyres_recipe_prepares_large_images_and_the_warm_ups_encoder_size_ones(tmp_path):
    import json

    from vlm.app.recipes import run_prepare
    from vlm.config import check_ranges, load_config
    from vlm.data.anyres import TilingSpec

    recipe = "configs/demo/anyres_shapes.yaml"
    cfg = load_config(recipe, [f"out_dir={tmp_path}", "prepare.shapes.num_train=2", "prepare.shapes.num_test=1",
                               "prepare.extra_shapes.0.num_train=3"])
    run_prepare(cfg)
    warmup, instruct = cfg.stages.vision_warmup.data[0].args, cfg.stages.instruct.data[-1].args
    # instruct reads the warm-up's one-tile images first (the LLM learns to read a tile), then the large ones
    assert cfg.stages.instruct.data[0].args.image_root == warmup.image_root
    sizes = {name: {Image.open(p).size for p in Path(root).glob("*.png")}
             for name, root in (("warmup", warmup.image_root), ("instruct", instruct.image_root))}
    assert sizes == {"warmup": {(64, 64)}, "instruct": {(256, 256)}}
    assert len(json.loads(Path(warmup.path).read_text())["images"]) == 3
    # a warm-up image is one tile at its own size; a large image a 2 x 2 grid of the encoder's size
    spec = TilingSpec.from_config(cfg.model.vision.tiling, 64, 4, [0.5] * 3, [0.5] * 3)
    assert (spec.layout(64, 64).rows, spec.layout(256, 256).rows) == (1, 2)
    with pytest.raises(ConfigError, match=r"prepare\.extra_shapes\.0\.shape_scale = 3\.0: must be in \[0\.1, 1\.6\]"):
        check_ranges(load_config(recipe, ["prepare.extra_shapes.0.shape_scale=3"]))
