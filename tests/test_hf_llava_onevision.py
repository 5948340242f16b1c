"""`vlm export hf-llava-onevision`: the folder used as transformers users use it (AutoProcessor,
its chat template, generate) gives vlm's prompt ids, logits and `vlm chat`'s answer for one
image, two images and a video; what LLaVA-OneVision cannot hold is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, run_vlm, tiny_model_config, write_images
from PIL import Image
from test_anyres import PINPOINTS
from test_hf_llava_interop import write_stage_output
from test_multi_image_video import _train as train_packed
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
)

from vlm.checkpoint.pretrained import load_pretrained
from vlm.core.errors import ConfigError
from vlm.data.batch import Collator
from vlm.data.types import Sample, Turn
from vlm.data.video import read_frames
from vlm.inference.chat import answer
from vlm.inference.generation import stop_settings
from vlm.modeling.processing import build_processor

QUESTION = "what color is the shape?"
ONEVISION = {"vision.tiling.enabled": True, "vision.tiling.grid_pinpoints": PINPOINTS, "template": "chatml",
             "vision.tiling.multi_image": "base", "video.newline": True}


def onevision_config(tokenizer_dir, **overrides):
    return tiny_model_config(tokenizer_dir, **{**ONEVISION, **overrides})


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_dir):
    """A tiny OneVision-layout model as a stage output, reloaded as `vlm chat` loads it, and its export."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("onevision")
    cfg = onevision_config(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stage_out = write_stage_output(root / "instruct" / "final", build_tiny_model(cfg, tokenizer, seed=11), cfg,
                                   tokenizer)
    model, tok, model_cfg = load_pretrained(stage_out, device="cpu")
    code, out, _ = _run_export(stage_out, root / "hf")
    assert code == 0 and "exported:" in out
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(str(root / "hf")).eval()
    # PIL's bicubic for the images, as vlm (the default torchvision backend differs by ~1 grey level);
    # the video processor has no PIL backend
    images = AutoImageProcessor.from_pretrained(str(root / "hf"), backend="pil")
    hf_processor = AutoProcessor.from_pretrained(str(root / "hf"), image_processor=images)
    return model, build_processor(model, tok, model_cfg), hf, hf_processor, root


def _run_export(stage_out, out):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from vlm.app.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            main(["export", "hf-llava-onevision", str(stage_out), "--out", str(out)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, stdout.getvalue(), stderr.getvalue()


def _vlm_logits(model, processor, sample):
    """vlm's prompt ids, logits and greedy new tokens (as ``generate_answers`` decodes them)."""
    batch = Collator(processor.tokenizer.pad_token_id or 0)([processor.encode(sample, for_generation=True)])
    with torch.no_grad():
        out = model(**batch.model_inputs(with_labels=False))
    new = model.generate(batch.input_ids, batch.attention_mask, batch.images, image_layouts=batch.image_layouts,
                         frame_mask=batch.frames, max_new_tokens=24, do_sample=False, **stop_settings(processor))
    return batch.input_ids[0].tolist(), out.logits[0], new[0].tolist()


def _check_round_trip(exported, sample, messages, hf_inputs_of):
    model, processor, hf, hf_processor, _ = exported
    ours_ids, ours_logits, ours_new = _vlm_logits(model, processor, sample)
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_inputs_of(hf_processor, text)
    ids = inputs["input_ids"][0]
    # transformers writes a video's placeholders as its own <video> id; vlm as the image id
    assert ids.masked_fill(ids == hf.config.video_token_id, model.image_token_id).tolist() == ours_ids
    with torch.no_grad():
        logits = hf(**inputs).logits[0]
    torch.testing.assert_close(logits[:, :ours_logits.shape[-1]], ours_logits, atol=1e-5, rtol=1e-5)
    expected = answer(model, processor, sample.images, sample.turns, max_new_tokens=24, videos=sample.videos)
    with torch.no_grad():
        new = hf.generate(**inputs, max_new_tokens=24)[0, ids.shape[0]:]
    assert new.tolist() == ours_new  # the same greedy tokens
    got = hf_processor.decode(new, skip_special_tokens=True).strip()
    assert got == expected and got
    return ids


@pytest.mark.parametrize("size", [(100, 37), (30, 75)])  # wide (1 x 3 grid), tall (2 x 1): both unpad directions
def test_one_image_is_tiled_as_vlm_tiles_it(exported, size):
    path = write_images(exported[4] / f"one_{size[0]}", sizes=[size])[0]
    sample = Sample(id="s", turns=[Turn("user", f"<image>\n{QUESTION}")], images=[path])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]

    def inputs(hf_processor, text):
        with Image.open(path) as img:
            return hf_processor(images=img, text=text, return_tensors="pt")

    ids = _check_round_trip(exported, sample, messages, inputs)
    layout = exported[1].image_layouts([path])[0]
    assert layout.rows * layout.cols > 1 and int((ids == exported[0].image_token_id).sum()) == layout.num_tokens()


def test_two_images_are_each_their_overview_and_a_newline(exported):
    paths = write_images(exported[4] / "two", sizes=[(100, 37), (30, 75)])
    sample = Sample(id="s", turns=[Turn("user", f"<image>\n<image>\n{QUESTION}")], images=paths)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                              {"type": "text", "text": QUESTION}]}]

    def inputs(hf_processor, text):
        images = [Image.open(p).convert("RGB") for p in paths]
        return hf_processor(images=[images], text=[text], return_tensors="pt")

    ids = _check_round_trip(exported, sample, messages, inputs)
    assert int((ids == exported[0].image_token_id).sum()) == 2 * (16 + 1)  # the overview's 4 x 4, one newline


def test_a_video_is_its_pooled_frames_and_one_newline(exported):
    folder = exported[4] / "clip"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):  # frames at the encoder's size: transformers' video resize is then exact
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    sample = Sample(id="s", turns=[Turn("user", f"<video>\n{QUESTION}")], videos=[str(folder)])
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    frames = read_frames(str(folder), exported[1].frame_sampling)  # the frames vlm reads, as PIL images

    def inputs(hf_processor, text):
        return hf_processor(videos=[frames], text=text, return_tensors="pt")

    ids = _check_round_trip(exported, sample, messages, inputs)
    assert int((ids == exported[2].config.video_token_id).sum()) == 5 * 4 + 1  # 2 x 2 pooled frames, a newline


def test_an_image_and_a_video_in_one_prompt(exported):
    """One image beside a video is tiled (transformers counts images only in batch_num_images)."""
    path = write_images(exported[4] / "mixed", sizes=[(30, 75)])[0]
    frames = [Image.open(path).convert("RGB").resize((32, 32)).rotate(90 * i) for i in range(3)]
    sample = Sample(id="s", turns=[Turn("user", f"<image>\n<video>\n{QUESTION}")], images=[path], videos=[frames])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"},
                                              {"type": "text", "text": QUESTION}]}]

    def inputs(hf_processor, text):
        with Image.open(path) as img:
            return hf_processor(images=img, videos=[frames], text=text, return_tensors="pt")

    ids = _check_round_trip(exported, sample, messages, inputs)
    assert int((ids == exported[2].config.video_token_id).sum()) == 3 * 4 + 1
    assert int((ids == exported[0].image_token_id).sum()) == exported[1].image_layouts([path])[0].num_tokens()


def test_the_export_records_its_layout(exported):
    info = json.loads((exported[4] / "hf" / "vlm_export.json").read_text())
    assert info["tiling"]["multi_image"] == "base" and info["tiling"]["vision_aspect_ratio"] == "anyres_max_4"
    # the most tiles of a pinpoint (2 x 2): OneVision's interpolation of large maps never applies
    assert exported[2].config.vision_aspect_ratio == exported[3].vision_aspect_ratio == "anyres_max_4"
    assert info["video"] == {"pool": 2, "newline": True, "video_token": "<video>",
                             "video_token_id": exported[2].config.video_token_id}


@pytest.mark.parametrize("overrides, words", [
    ({"vision.tiling.multi_image": "tiled"}, "multi_image = tiled: LLaVA-OneVision shows each image"),
    ({"video.newline": False}, "model.video.newline = false: LLaVA-OneVision ends every video"),
    ({"video.pool": 3}, "model.video.pool = 3: LLaVA-OneVision pools every video frame by 2"),
    ({"vision.tiling.pool_stride": 2}, "pool_stride = 2: LLaVA-OneVision pools no tile"),
])
def test_a_layout_onevision_cannot_hold_is_refused_with_one_line(tmp_path, tokenizer_dir, tokenizer, capsys,
                                                                 overrides, words):
    cfg = onevision_config(tokenizer_dir, **overrides)
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    code, _, err = run_vlm(["export", "hf-llava-onevision", str(stage_out), "--out", str(tmp_path / "hf")], capsys)
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if words in ln]
    assert len(lines) == 1, err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_a_onevision_model_is_refused_as_llava_next(tmp_path, tokenizer_dir, tokenizer, capsys):
    cfg = onevision_config(tokenizer_dir)
    stage_out = write_stage_output(tmp_path / "s" / "final", build_tiny_model(cfg, tokenizer), cfg, tokenizer)
    code, _, err = run_vlm(["export", "hf-llava-next", str(stage_out), "--out", str(tmp_path / "hf")], capsys)
    assert code != 0 and "multi_image = base: LLaVA-NeXT tiles every image" in err


def test_video_newline_needs_the_tiles_newline(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, **{"video.newline": True})
    with pytest.raises(ConfigError, match="model.video.newline: true needs model.vision.tiling"):
        build_tiny_model(cfg, tokenizer)
    cfg = onevision_config(tokenizer_dir, **{"vision.tiling.newline": False})
    with pytest.raises(ConfigError, match="model.video.newline"):
        build_tiny_model(cfg, tokenizer)


def test_multi_image_must_be_tiled_or_base(tokenizer_dir, tokenizer):
    cfg = onevision_config(tokenizer_dir, **{"vision.tiling.multi_image": "overview"})
    with pytest.raises(ConfigError, match="model.vision.tiling.multi_image = 'overview': must be one of tiled, base"):
        build_tiny_model(cfg, tokenizer)


def test_the_onevision_layout_trains_and_generates_through_the_dataset(tmp_path, tokenizer_dir, tokenizer):
    """The dataset path (planned counts, tiles, frames' layouts) gives what the processor gives;
    a loss over one image, two images, a video and an image with a video goes down, the row-end
    token learns, and batched generation answers as one sample at a time."""
    from vlm.data.dataset import ConversationDataset
    from vlm.inference.generation import generate_answers

    cfg = onevision_config(tokenizer_dir, **{"video.num_frames": 3})
    model = build_tiny_model(cfg, tokenizer, seed=2)
    processor = build_processor(model, tokenizer, cfg)
    a, b = write_images(tmp_path / "img", sizes=[(100, 37), (30, 75)])
    clip = [Image.open(a).convert("RGB").resize((32, 32))] * 2 + [Image.open(b).convert("RGB").resize((32, 32))]
    user = [("<image>\nwhich?", [a], []), ("<image>\n<image>\nwhich?", [b, a], []), ("<video>\nwhich?", [], [clip]),
            ("<image>\n<video>\nwhich?", [a], [clip])]
    samples = [Sample(id=str(i), turns=[Turn("user", text), Turn("assistant", reply)], images=images, videos=videos,
                      meta={"source": f"t#{i}"})
               for i, ((text, images, videos), reply) in enumerate(zip(user, ["red", "blue square", "circle", "green"]))]
    dataset = ConversationDataset(samples, processor, progress=False)
    assert dataset.stats["kept"] == 4
    for i, sample in enumerate(samples):
        direct = processor.encode(sample)
        assert dataset[i].input_ids == direct.input_ids and dataset[i].image_layouts == direct.image_layouts
        assert all(torch.equal(x, y) for x, y in zip(dataset[i].images, direct.images))
    tokens = [dataset[i].input_ids.count(model.image_token_id) for i in range(4)]
    one = processor.image_layouts([a])[0].num_tokens()
    assert tokens == [one, 2 * 17, 3 * 4 + 1, one + 3 * 4 + 1]

    newline = model.connector.image_newline.detach().clone()
    _, losses = train_packed(model, processor, samples, steps=12)
    assert losses[-1] < 0.7 * losses[0], losses
    assert not torch.equal(newline, model.connector.image_newline)
    prompts = [Sample(id=s.id, turns=s.turns[:1], images=s.images, videos=s.videos) for s in samples]
    batched = generate_answers(model, processor, prompts, batch_size=4, max_new_tokens=6)
    assert batched == [generate_answers(model, processor, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]


def test_a_tiled_video_sample_fits_its_image_first_then_loses_frames(tmp_path, tokenizer_dir, tokenizer):
    """The budget with videos (vlm/data/budget.py, step 3): the image keeps its tiles, the video
    gives up frames (each 4 tokens, one newline per video), and the dataset loads the planned
    frames as the processor does with that count."""
    from vlm.data.dataset import ConversationDataset

    cfg = onevision_config(tokenizer_dir, **{"video.num_frames": 6})
    model = build_tiny_model(cfg, tokenizer, seed=2)
    (a,) = write_images(tmp_path / "img", sizes=[(100, 37)])
    clip = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(6)]
    sample = Sample(id="s", turns=[Turn("user", "<image>\n<video>\nwhich?"), Turn("assistant", "red")],
                    images=[a], videos=[clip], meta={"source": "v.json:1"})
    free = build_processor(model, tokenizer, cfg)
    one = free.image_layouts([a])[0].num_tokens()
    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=one + 2 * 4 + 1)
    dataset = ConversationDataset([sample], processor, progress=False)
    assert dataset.frame_counts == {0: [2]} and dataset.layouts[0] == free.image_layouts([a])
    item = dataset[0]
    assert item.input_ids.count(model.image_token_id) == one + 2 * 4 + 1
    frames = processor.sampled_frames(clip, 2)  # the first and the last frame
    assert [f.getpixel((0, 0)) for f in frames] == [(0, 0, 0), (200, 0, 0)]
    assert item.frames == [False, True, True]
    visuals, _ = processor.load_tiled_visuals(sample.turns, [a], [clip], dataset.layouts[0], [2])
    assert all(torch.equal(x, y) for x, y in zip(item.images, visuals.tensors))
    assert not torch.equal(item.images[1], item.images[2])  # two distinct frames, not one repeated


def test_the_new_keys_are_checked_when_a_config_loads(tokenizer_dir):
    from vlm.app.wiring import check_model

    check_model(onevision_config(tokenizer_dir))
    with pytest.raises(ConfigError, match="model.video.newline: true needs model.vision.tiling with newline: true"):
        check_model(tiny_model_config(tokenizer_dir, **{"video.newline": True}))
    with pytest.raises(ConfigError, match="model.vision.tiling.multi_image = 'each': must be one of tiled, base"):
        check_model(onevision_config(tokenizer_dir, **{"vision.tiling.multi_image": "each"}))


def test_base_layout_shows_each_image_of_several_as_its_overview_within_the_budget(tokenizer_dir, tokenizer):
    from vlm.data.budget import OverBudget, fit_layouts

    model = build_tiny_model(onevision_config(tokenizer_dir), tokenizer)
    spec, sizes = model.tiling, [(37, 100), (75, 30)]
    one = fit_layouts(sizes[:1], spec, None)[0]
    assert (one.rows, one.cols) == (1, 3)  # a sample with one image: tiled
    layouts = fit_layouts(sizes, spec, None)
    assert [(x.rows, x.cols, x.num_tokens()) for x in layouts] == [(0, 0, 17), (0, 0, 17)]
    pooled = fit_layouts(sizes, spec, 10)  # over budget: the overviews pooled 4 x 4 -> 2 x 2
    assert [(x.side, x.num_tokens()) for x in pooled] == [(2, 5), (2, 5)]
    with pytest.raises(OverBudget, match="more than max_visual_tokens 3"):
        fit_layouts(sizes, spec, 3)
    tiled = build_tiny_model(onevision_config(tokenizer_dir, **{"vision.tiling.multi_image": "tiled"}), tokenizer)
    assert all(x.rows for x in fit_layouts(sizes, tiled.tiling, None))  # the default keeps tiling each image


def test_grids_past_anyres_max_9_keep_vlm_counts(tokenizer_dir, tokenizer):
    """With grids of up to 12 tiles OneVision's default anyres_max_9 would shrink a 3 x 4 map;
    the exported processor's anyres_max_12 keeps vlm's count."""
    from vlm.interop.hf_llava_onevision import build_llava_onevision_processor

    cfg = onevision_config(tokenizer_dir, **{"vision.tiling.grid_pinpoints": None, "vision.tiling.max_tiles": 12})
    model = build_tiny_model(cfg, tokenizer)
    ours = build_processor(model, tokenizer, cfg)
    hf_processor = build_llava_onevision_processor(model, tokenizer, cfg)
    assert hf_processor.vision_aspect_ratio == "anyres_max_12"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    layout = ours.image_layouts([image])[0]
    assert (layout.rows, layout.cols) == (3, 4)
    text = hf_processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    ids = hf_processor(images=image, text=text, return_tensors="pt")["input_ids"][0]
    assert int((ids == model.image_token_id).sum()) == layout.num_tokens() == 16 + 12 * 16 + 12
