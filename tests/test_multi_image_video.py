"""Several images and videos per sample: readers, frame sampling and pooling, token counts,
training and generation end to end, and the robustness cases (one line each, nothing lost)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import NUM_PATCHES, build_tiny_model, tiny_model_config
from PIL import Image

from vlm.core.errors import DataFormatError, ImageLoadError
from vlm.data.batch import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.formats import read_llava_json
from vlm.data.synthetic import COLORS
from vlm.data.types import Sample, Turn
from vlm.data.video import FrameSampling, probe, read_frames, write_video
from vlm.inference.generation import generate_answers
from vlm.modeling.frame_pooling import pool_frames
from vlm.modeling.processing import build_processor

FRAME_TOKENS = 4  # the tiny model's 4 x 4 patch grid pooled by 2


def _frames(n: int, size: int = 32):
    """``n`` frames of a square moving left to right on grey, each a distinct image."""
    frames = []
    for i in range(n):
        pixels = np.full((size, size, 3), 200, dtype=np.uint8)
        x = 2 + i * (size - 10) // max(1, n - 1)
        pixels[12:20, x:x + 8] = (220, 30, 30)
        frames.append(Image.fromarray(pixels))
    return frames


@pytest.fixture
def media(tmp_path, image_paths):
    """Two images, a gif, two mp4s, a folder of frames, an empty folder and a corrupt video."""
    root = tmp_path / "media"
    root.mkdir()
    write_video(str(root / "clip.gif"), _frames(8))
    write_video(str(root / "clip.mp4"), _frames(12))
    (root / "frames").mkdir()
    for i, frame in enumerate(_frames(5)):
        frame.save(root / "frames" / f"{i:03d}.png")
    (root / "empty").mkdir()
    (root / "broken.mp4").write_bytes(b"not a video at all")
    for i, path in enumerate(image_paths[:2]):
        Image.open(path).save(root / f"img{i}.png")
    write_video(str(root / "ab.mp4"), [Image.open(p).convert("RGB").resize((32, 32)) for p in image_paths[:2]
                                     for _ in range(3)])
    return root


@pytest.fixture
def setup(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir, template="chatml", **{"video.num_frames": 4})
    model = build_tiny_model(cfg, tokenizer)
    return model, build_processor(model, tokenizer, cfg), cfg


def _write(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


# ---------------------------------------------------------------------------------------------
# readers


def test_llava_json_reads_image_lists_interleaved_markers_and_video_entries(tmp_path, media):
    records = [
        {"id": "pair", "image": ["img0.png", "img1.png"],
         "conversations": [{"from": "human", "value": "<image>\nand\n<image>\nsame colour?"},
                           {"from": "gpt", "value": "yes"}]},
        {"id": "later", "image": ["img0.png", "img1.png"],
         "conversations": [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a"},
                           {"from": "human", "value": "now <image> this one?"}, {"from": "gpt", "value": "b"}]},
        {"id": "no-markers", "image": ["img0.png", "img1.png"],
         "conversations": [{"from": "human", "value": "compare"}, {"from": "gpt", "value": "c"}]},
        # LLaVA-Video's convention: the video marked with <image>
        {"id": "llava-video", "video": "clip.mp4",
         "conversations": [{"from": "human", "value": "<image>\nwhere does it go?"}, {"from": "gpt", "value": "right"}]},
        {"id": "mixed", "image": "img0.png", "video": ["frames", "clip.gif"],
         "conversations": [{"from": "human", "value": "<video> then <image> then <video>?"},
                           {"from": "gpt", "value": "d"}]},
    ]
    samples = read_llava_json(_write(tmp_path / "d.json", records), image_root=media)
    pair, later, bare, video, mixed = samples
    assert pair.images == [str(media / "img0.png"), str(media / "img1.png")] and not pair.videos
    assert later.turns[2].content == "now <image> this one?"
    assert bare.turns[0].content == "<image>\n<image>\ncompare"
    assert video.videos == [str(media / "clip.mp4")] and video.turns[0].content == "<video>\nwhere does it go?"
    assert mixed.videos == [str(media / "frames"), str(media / "clip.gif")] and mixed.images == [str(media / "img0.png")]


@pytest.mark.parametrize("record, message", [
    ({"image": ["img0.png", "img1.png"], "conversations": [{"from": "human", "value": "<image> q"},
                                                           {"from": "gpt", "value": "a"}]},
     "d.json#0: field 'conversations' has 1 '<image>' marker(s) but field 'image' names 2 image(s)"),
    ({"image": "img0.png", "video": "clip.gif", "conversations": [{"from": "human", "value": "<image> <video> <video>"},
                                                                  {"from": "gpt", "value": "a"}]},
     "d.json#0: field 'conversations' has 2 '<video>' marker(s) but field 'video' names 1 video(s)"),
    ({"video": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "d.json#0: field 'video' must be a string or a list of strings, got int"),
])
def test_a_marker_count_that_does_not_match_is_one_line_naming_the_record(tmp_path, media, record, message):
    with pytest.raises(DataFormatError) as info:
        read_llava_json(_write(tmp_path / "d.json", [record]), image_root=media)
    assert str(info.value).endswith(message) and "\n" not in str(info.value)


def test_a_sample_checks_its_video_markers():
    with pytest.raises(DataFormatError, match=r"x#1: 1 '<video>' marker\(s\) but 0 video\(s\)"):
        Sample(id="s", turns=[Turn("user", "<video> q")], meta={"source": "x#1"})


# ---------------------------------------------------------------------------------------------
# frames


@pytest.mark.parametrize("name, total", [("clip.gif", 8), ("clip.mp4", 12), ("frames", 5)])
def test_frames_decode_from_gif_mp4_and_folders(media, name, total):
    count, _ = probe(str(media / name))
    assert count == total
    frames = read_frames(str(media / name), FrameSampling(num_frames=3))
    assert len(frames) == 3 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    reds = [int(np.argmax((np.asarray(f)[16, :, 1] < 100))) for f in frames]  # the square's left edge
    assert reds[0] < reds[1] < reds[2], reds  # first, middle, last frame: the square moved right


def test_frame_sampling_by_count_and_by_fps():
    assert FrameSampling(num_frames=4).indices(10, 30.0) == [0, 3, 6, 9]
    assert FrameSampling(num_frames=8).indices(3, None) == [0, 1, 2]  # never more frames than there are
    assert FrameSampling(num_frames=8, fps=2).indices(40, 10.0) == [0, 5, 10, 15, 20, 25, 30, 35]
    assert FrameSampling(num_frames=3, fps=2).indices(40, 10.0) == [0, 5, 10]  # capped at num_frames
    assert FrameSampling(num_frames=8, fps=1).indices(12, 4.0) == [0, 4, 8]
    assert FrameSampling().indices(0, 4.0) == []


def test_frame_pooling_equals_transformers_llava_onevision():
    from transformers.models.llava_onevision import modeling_llava_onevision

    for side in (4, 5, 7):
        tokens = torch.randn(3, side * side, 6)
        owner = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=side * 14,
                                                                                       patch_size=14)))
        expected = modeling_llava_onevision.LlavaOnevisionModel.apply_pooling(owner, tokens)
        assert torch.allclose(pool_frames(tokens, 2), expected, atol=1e-6)
        assert pool_frames(tokens, 2).shape[1] == math.ceil(side / 2) ** 2


# ---------------------------------------------------------------------------------------------
# processor, model, training and generation


def test_a_video_expands_to_its_frames_pooled_tokens_in_marker_order(setup, media):
    model, processor, _ = setup
    assert model.num_image_tokens == NUM_PATCHES and model.num_frame_tokens == processor.num_frame_tokens == 4
    sample = Sample(id="s", turns=[Turn("user", "<image> and <video> and <image>"), Turn("assistant", "ok")],
                    images=[str(media / "img0.png"), str(media / "img1.png")], videos=[str(media / "clip.gif")])
    encoded = processor.encode(sample)
    ids = encoded.input_ids
    assert ids.count(processor.image_token_id) == 2 * NUM_PATCHES + 4 * FRAME_TOKENS
    assert encoded.frames == [False, True, True, True, True, False]
    runs = [len(list(group)) for token, group in itertools.groupby(ids) if token == processor.image_token_id]
    assert runs == [NUM_PATCHES, 4 * FRAME_TOKENS, NUM_PATCHES]  # image, the video's frames, image
    batch = Collator(processor.tokenizer.pad_token_id)([encoded])
    assert batch.frames.tolist() == encoded.frames and batch.images.shape[0] == 6
    with torch.no_grad():
        embeds, visual = model.embed(batch.input_ids, batch.images, frame_mask=batch.frames)
        frames = pool_frames(visual[1:5], 2).reshape(-1, visual.shape[-1])
    positions = (batch.input_ids[0] == processor.image_token_id).nonzero().squeeze(1)
    video_positions = positions[NUM_PATCHES:NUM_PATCHES + 4 * FRAME_TOKENS]
    assert torch.allclose(embeds[0, video_positions], frames, atol=1e-6)
    assert torch.allclose(embeds[0, positions[-NUM_PATCHES:]], visual[5], atol=1e-6)


def _train(model, processor, samples, steps: int = 60):
    dataset = ConversationDataset(samples, processor, progress=False)
    collate = Collator(processor.tokenizer.pad_token_id, packing=True, max_length=512)
    batch = collate([dataset[i] for i in range(len(dataset))])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch.model_inputs(), return_logits=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return dataset, losses


@pytest.mark.slow
def test_training_and_generation_with_two_images_and_with_a_video(setup, media):
    model, processor, _ = setup
    a, b = str(media / "img0.png"), str(media / "img1.png")
    samples = [
        Sample(id="ab", turns=[Turn("user", "<image>\n<image>\nwhich first?"), Turn("assistant", "red circle")],
               images=[a, b], meta={"source": "t#0"}),
        Sample(id="ba", turns=[Turn("user", "<image>\n<image>\nwhich first?"), Turn("assistant", "blue square")],
               images=[b, a], meta={"source": "t#1"}),
        # the same frames in opposite orders: one clip decoded from an mp4, one held in memory
        Sample(id="v", turns=[Turn("user", "<video>\nwhat comes first?"), Turn("assistant", "the circle")],
               videos=[str(media / "ab.mp4")], meta={"source": "t#2"}),
        Sample(id="f", turns=[Turn("user", "<video>\nwhat comes first?"), Turn("assistant", "the square")],
               videos=[[Image.open(b).resize((32, 32))] * 3 + [Image.open(a).resize((32, 32))] * 3], meta={"source": "t#3"}),
    ]
    dataset, losses = _train(model, processor, samples)
    assert dataset.stats["kept"] == 4 and dataset.frame_counts == {2: [4], 3: [4]}
    assert losses[-1] < 0.2 * losses[0], losses
    prompts = [Sample(id=s.id, turns=s.turns[:1], images=s.images, videos=s.videos) for s in samples]
    answers = generate_answers(model, processor, prompts, batch_size=4, max_new_tokens=6)
    assert answers == ["red circle", "blue square", "the circle", "the square"]
    if importlib.util.find_spec("lmms_eval") is not None:  # lmms-eval's requests: PIL images, videos as paths
        assert _through_lmms_eval(model, processor, [[Image.open(a), Image.open(b)], [Image.open(b), Image.open(a)],
                                                     [str(media / "ab.mp4")]]) == answers[:3]


def _through_lmms_eval(model, processor, visuals):
    """Answers of vlm's lmms-eval model to one "which first?" / "what comes first?" request per
    entry of ``visuals`` (what the task's doc_to_visual returns)."""
    from lmms_eval.api.model import lmms

    from vlm.evaluation.lmms_adapter import VLMLmms

    adapter = VLMLmms.__new__(VLMLmms)  # its model without loading a checkpoint
    lmms.__init__(adapter)
    adapter.model, adapter.processor, adapter.batch_size_per_gpu, adapter.default_max_new_tokens = model, processor, 2, 6
    adapter.task_dict = {"t": {"test": list(range(len(visuals)))}}
    kwargs = {"max_new_tokens": 6, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    requests = [SimpleNamespace(args=("what comes first?" if isinstance(v[0], str) else "which first?", kwargs,
                                      lambda doc: visuals[doc], i, "t", "test")) for i, v in enumerate(visuals)]
    return adapter.generate_until(requests)


# ---------------------------------------------------------------------------------------------
# robustness


def test_the_budget_takes_frames_away_before_it_leaves_a_video_sample_out(setup, media, tokenizer, caplog):
    """Step 3 of the budget (vlm/data/budget.py): the video with the most frames gives one up at a
    time (spread evenly again), down to one frame per video; then the sample is left out."""
    model, _, cfg = setup  # 4 frames per video, FRAME_TOKENS each; an image is NUM_PATCHES tokens
    image = str(media / "img0.png")
    samples = [
        Sample(id="two", turns=[Turn("user", "<video>\n<video>\nsame?"), Turn("assistant", "no")],
               videos=[str(media / "clip.mp4"), str(media / "frames")], meta={"source": "b.json:1"}),
        Sample(id="mixed", turns=[Turn("user", "<image>\n<video>\nsame?"), Turn("assistant", "yes")],
               images=[image], videos=[str(media / "clip.gif")], meta={"source": "b.json:2"}),
    ]
    budget = NUM_PATCHES + FRAME_TOKENS  # the image and one frame
    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=budget)
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(samples, processor, progress=False)
    # 4 + 4 frames -> 3 + 4 -> 3 + 3 -> 2 + 3 (5 frames: the image's worth of tokens and one frame)
    assert dataset.frame_counts == {0: [2, 3], 1: [1]} and dataset.stats["over_visual_budget"] == 0
    item = dataset[0]
    assert len(item.images) == 5 and item.frames == [True] * 5
    spread = read_frames(str(media / "clip.mp4"), FrameSampling(num_frames=2))  # first and last frame
    for got, frame in zip(item.images[:2], spread):
        torch.testing.assert_close(got, processor.load_image(frame))

    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=3 * FRAME_TOKENS)
    assert processor.frame_counts(samples[0]) == [1, 2]  # the first of equals gives up first
    processor = build_processor(model, tokenizer, cfg, max_visual_tokens=budget - 1)
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(samples, processor, progress=False)
    assert dataset.frame_counts == {0: [2, 2]} and dataset.left_out["over_visual_budget"] == ["b.json:2"]
    assert any("b.json:2" in r.getMessage() and f"max_visual_tokens {budget - 1}" in r.getMessage()
               for r in caplog.records)


def test_undecodable_and_empty_videos_are_left_out_counted_and_named(setup, media, caplog):
    _, processor, _ = setup
    samples = [
        Sample(id=str(i), turns=[Turn("user", "<video> q"), Turn("assistant", "a")], videos=[str(media / name)],
               meta={"source": f"v.json#{i}"})
        for i, name in enumerate(["broken.mp4", "empty", "clip.gif", "missing.webm"])
    ]
    with caplog.at_level(logging.WARNING):
        dataset = ConversationDataset(samples, processor, progress=False)
    assert dataset.stats["kept"] == 1 and dataset.stats["unreadable_video"] == 3
    assert dataset.left_out["unreadable_video"] == ["v.json#0", "v.json#1", "v.json#3"]
    lines = [r.getMessage() for r in caplog.records]
    assert any("v.json#0" in line and "broken.mp4" in line for line in lines)
    assert any("v.json#1" in line and "0 frames" in line for line in lines)
    assert all("\n" not in line for line in lines)


def test_generation_names_an_unreadable_video_or_skips_it(setup, media):
    model, processor, _ = setup
    bad = Sample(id="b", turns=[Turn("user", "<video> q")], videos=[str(media / "broken.mp4")])
    good = Sample(id="g", turns=[Turn("user", "<video> q")], videos=[str(media / "frames")])
    with pytest.raises(ImageLoadError, match="broken.mp4"):
        generate_answers(model, processor, [bad], max_new_tokens=2)
    answers = generate_answers(model, processor, [bad, good], max_new_tokens=2, skip_unreadable=True)
    assert answers[0] is None and isinstance(answers[1], str)


def test_a_model_without_a_token_grid_refuses_video(tokenizer_dir, tokenizer, media):
    cfg = tiny_model_config(tokenizer_dir, **{"vision.keep_cls": True})  # 17 tokens: no square grid
    model = build_tiny_model(cfg, tokenizer)
    processor = build_processor(model, tokenizer, cfg)
    assert model.num_frame_tokens is None
    sample = Sample(id="s", turns=[Turn("user", "<video> q")], videos=[str(media / "clip.gif")])
    with pytest.raises(ValueError, match="takes no video"):
        processor.encode(sample, for_generation=True)


# ---------------------------------------------------------------------------------------------
# image placement: a property of the model, recorded from its training data


def _sample(content: str, images=("a.png",), videos=()):
    return Sample(id="s", turns=[Turn("user", content), Turn("assistant", "x")], images=list(images),
                  videos=list(videos))


def test_placement_is_first_for_single_image_data_and_positional_for_interleaved_data():
    from vlm.data.placement import placement_of

    assert placement_of([_sample("<image>\nwhat?"), _sample("text only", images=())]) == "first"
    assert placement_of([_sample("<image>\nwhat?"), _sample("<image>\n<image>\nsame?", images=("a", "b"))]) == \
        "positional"
    assert placement_of([_sample("what is in <image> here?")]) == "positional"
    assert placement_of([_sample("<video>\nwhere?", images=(), videos=("v.mp4",))]) == "first"


def test_a_first_placement_model_gets_text_first_prompts_as_it_was_trained(setup):
    from vlm.core.errors import ConfigError
    from vlm.data.placement import check_placement

    model, processor, cfg = setup
    text_first = [Turn("user", "what color?\n<image>\n<image>\n")]
    image_first = [Turn("user", "<image>\n<image>\nwhat color?")]
    assert processor.prompt_turns(text_first) == text_first  # null: positional, as before
    cfg.image_placement = "first"
    placed = build_processor(model, processor.tokenizer, cfg)
    assert placed.prompt_turns(text_first) == image_first
    assert placed.tokenize(placed.prompt_turns(text_first), add_generation_prompt=True) == \
        processor.tokenize(image_first, add_generation_prompt=True)
    cfg.image_placement = "positional"
    assert build_processor(model, processor.tokenizer, cfg).prompt_turns(text_first) == text_first
    with pytest.raises(ConfigError, match="model.image_placement = 'middle': must be one of"):
        check_placement("middle")


def test_a_stage_records_its_datas_placement_unless_the_config_sets_one(setup):
    from omegaconf import OmegaConf

    from vlm.data.placement import with_recorded_placement

    _, _, cfg = setup
    pairs = [_sample("<image>\n<image>\nsame?", images=("a", "b"))]
    recorded = with_recorded_placement(cfg, pairs)
    assert recorded.image_placement == "positional" and cfg.image_placement is None
    assert with_recorded_placement(cfg, [_sample("<image>\nq")]).image_placement == "first"
    assert OmegaConf.to_container(recorded)["llm"] == OmegaConf.to_container(cfg)["llm"]
    cfg.image_placement = "first"
    assert with_recorded_placement(cfg, pairs).image_placement == "first"


def test_vlm_chat_takes_several_images_and_a_video_in_marker_order(setup, media):
    from vlm.app.cli import build_parser
    from vlm.inference.chat import answer, visual_markers

    model, processor, _ = setup
    args = build_parser().parse_args(["chat", "ckpt", "--image", "a.png", "--image", "b.png", "--video", "c.mp4"])
    assert args.image == ["a.png", "b.png"] and args.video == ["c.mp4"]
    assert visual_markers("<image>", args.image, args.video) == "<image>\n<image>\n<video>\n"
    a, b, clip = str(media / "img0.png"), str(media / "img1.png"), str(media / "clip.gif")
    turns = [Turn("user", visual_markers("<image>", [a, b], [clip]) + "q")]
    expected = generate_answers(model, processor, [Sample(id="e", turns=turns, images=[a, b], videos=[clip])],
                                max_new_tokens=4)
    assert answer(model, processor, [a, b], turns, max_new_tokens=4, videos=[clip]) == expected[0]


def test_a_trained_stage_saves_the_placement_of_its_data_and_loads_with_it(tmp_path, tokenizer_dir, media):
    from conftest import run_config

    from vlm.app.stages import run_stage
    from vlm.checkpoint.pretrained import load_pretrained

    records = [{"id": str(i), "image": ["img0.png", "img1.png"], "video": "clip.gif",
                "conversations": [{"from": "human", "value": "<image>\n<image>\n<video>\nsame?"},
                                  {"from": "gpt", "value": "yes"}]} for i in range(2)]
    path = _write(tmp_path / "pairs.json", records)
    stages = {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                    "data": [{"format": "llava_json", "args": {"path": path, "image_root": str(media)}}],
                    "batch_size": 2, "max_steps": 1, "log_every": 1}}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"video": {"num_frames": 2}})
    final = run_stage(cfg, "s")
    _, tokenizer, model_cfg = load_pretrained(final)
    assert model_cfg.image_placement == "positional" and cfg.model.image_placement is None


# ---------------------------------------------------------------------------------------------
# data: image pairs and clips of shapes


def test_shapes_pairs_and_clips_read_back_with_their_questions(tmp_path, capsys):
    from conftest import run_vlm

    from vlm.data.formats import read_vqav2
    from vlm.data.synthetic_multi import DIRECTIONS, generate_multi_shapes

    code, out, _ = run_vlm(["data", "shapes", "--kind", "clips", "--out", tmp_path / "c", "--num-train", "6",
                            "--num-test", "2", "--image-size", "32", "--num-frames", "8"], capsys)
    assert code == 0
    clips = json.loads(out)
    samples = read_llava_json(clips["train"]["conversations"], clips["train"]["root"])
    assert len(samples) == 6 and all(len(s.videos) == 1 and not s.images for s in samples)
    frames = read_frames(samples[0].videos[0], FrameSampling(num_frames=8))
    assert len(frames) == 8
    attrs = json.loads(Path(clips["train"]["attributes"]).read_text())[0]
    dx, dy = DIRECTIONS[attrs["direction"]]
    rgb = np.array(COLORS[attrs["mover"]["color"]])
    centres = [np.argwhere(np.abs(np.asarray(f, dtype=int) - rgb).sum(-1) < 40).mean(0) for f in (frames[0], frames[-1])]
    moved = centres[1] - centres[0]  # (row, column)
    assert np.sign(np.round(moved[1] / 4)) == dx and np.sign(np.round(moved[0] / 4)) == dy, (attrs["direction"], moved)
    questions = read_vqav2(clips["test"]["questions"], clips["test"]["annotations"], clips["test"]["root"])
    assert len(questions) == 6 and questions[0].turns[0].content.startswith("<video>\n")
    assert {q.meta["question"].split()[0] for q in questions} == {"which", "how", "what"}

    pairs = generate_multi_shapes(str(tmp_path / "p"), "pairs", num_train=4, num_test=2, image_size=32)
    samples = read_llava_json(pairs["train"]["conversations"], pairs["train"]["root"])
    assert all(len(s.images) == 2 for s in samples) and len(samples[0].turns) == 8
    questions = read_vqav2(pairs["test"]["questions"], pairs["test"]["annotations"], pairs["test"]["root"])
    assert len(questions) == 8
    assert all(q.turns[0].content.startswith("first image: <image>\nsecond image: <image>\n") for q in questions)
    firsts = [json.loads(Path(clips["train"]["conversations"]).read_text())[i]["conversations"][0]["value"]
              for i in range(6)]
    assert len({first.split("\n")[1].split()[0] for first in firsts}) > 1  # the order varies per sample
    assert all(Path(p).is_file() for q in questions for p in q.images)


@pytest.mark.parametrize("recipe, kind", [("pair_shapes", "pairs"), ("video_shapes", "clips")])
def test_a_recipes_prepare_step_writes_the_pairs_or_clips_its_stages_read(tmp_path, recipe, kind):
    from vlm.app.recipes import run_prepare
    from vlm.config import load_config

    cfg = load_config(f"configs/demo/{recipe}.yaml", [f"out_dir={tmp_path}", "prepare.multi.num_train=3",
                                                      "prepare.multi.num_test=1", "prepare.multi.image_size=32"])
    run_prepare(cfg)
    data = cfg.stages.instruct.data[0].args
    samples = read_llava_json(data.path, data.image_root)
    assert len(samples) == 3 and Path(cfg.prepare.tokenizer.out).is_dir()
    assert all(len(s.images) == 2 for s in samples) if kind == "pairs" else all(len(s.videos) == 1 for s in samples)
    assert len(json.loads(Path(cfg.evals.vqa.data.args.questions_path).read_text())["questions"]) >= 3


@pytest.mark.parametrize("name", ["vicuna_v1", "chatml"])
def test_the_exported_chat_template_places_images_as_the_processor_does(tokenizer, name):
    from vlm.data.placement import place_visuals
    from vlm.data.templates import build_template
    from vlm.interop.chat_template import jinja_chat_template

    ours = build_template(name, tokenizer)
    text_first = [{"type": "text", "text": "same colour?"}, {"type": "image"}, {"type": "image"}]
    for placement, turn in (("first", "<image>\n<image>\nsame colour?"), (None, "same colour?<image>\n<image>\n")):
        jinja = jinja_chat_template(name, tokenizer, image_placement=placement)
        got = tokenizer.apply_chat_template([{"role": "user", "content": text_first}], chat_template=jinja,
                                            tokenize=False, add_generation_prompt=True)
        placed = place_visuals([Turn("user", "same colour?<image>\n<image>\n")], placement)
        assert placed == [Turn("user", turn)]
        expected = ("<s>" if ours.add_bos else "") + "".join(
            s.text for s in ours.segments(placed, add_generation_prompt=True))
        assert got == expected
