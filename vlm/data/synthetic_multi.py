"""Shapes across images and time: image pairs with cross-image questions, clips of moving shapes."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from vlm.core.errors import ConfigError
from vlm.data.formats import VQA_PROMPT_SUFFIX
from vlm.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SPLITS,
    _annotator_answers,
    _draw_one,
    _sample_attributes,
    _write_json,
    draw_shape,
)

KINDS = ("pairs", "clips")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
_CORNERS = ((0.15, 0.15), (0.85, 0.15), (0.15, 0.85), (0.85, 0.85))
_NOISE = 4


def _pair(rng: np.random.Generator) -> Tuple[Dict[str, Any], Dict[str, Any], List[Tuple[str, str, str]]]:
    """Two images' attributes (same colour half the time, same shape half the time) and their
    questions ``(question, answer, answer type)``."""
    a, b = _sample_attributes(rng), _sample_attributes(rng)
    if rng.random() < 0.5:
        b["color"] = a["color"]
    if rng.random() < 0.5:
        b["shape"] = a["shape"]
    yes = {True: "yes", False: "no"}
    # each attribute question names one image at random, so both images' colours and shapes are asked for
    images = (("first", a), ("second", b))
    color_of, shape_of = images[int(rng.integers(2))], images[int(rng.integers(2))]
    questions = [
        ("are the shapes in the two images the same color?", yes[a["color"] == b["color"]], "yes/no"),
        ("are the two images showing the same shape?", yes[a["shape"] == b["shape"]], "yes/no"),
        (f"what color is the shape in the {color_of[0]} image?", color_of[1]["color"], "other"),
        (f"what shape is in the {shape_of[0]} image?", shape_of[1]["shape"], "other"),
    ]
    return a, b, questions


def _clip_plan(rng: np.random.Generator, num_frames: int) -> Tuple[Dict[str, Any], List[Tuple[str, str, str]]]:
    """One clip: a shape moving in one of four directions and 0-2 small shapes appearing in
    corners at distinct frames, with questions on motion, the order of appearance and the count."""
    colors = list(COLORS)
    order = rng.permutation(len(colors))
    mover = {"color": colors[order[0]], "shape": SHAPES[int(rng.integers(len(SHAPES)))], "radius": 0.13}
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    dx, dy = DIRECTIONS[direction]
    across = rng.uniform(0.4, 0.6)
    start = (0.5 - 0.27 * dx if dx else across, 0.5 - 0.27 * dy if dy else across)
    extras = []
    frames = rng.choice(np.arange(1, num_frames), size=int(rng.integers(0, 3)), replace=False)
    corners = rng.permutation(len(_CORNERS))
    for k, frame in enumerate(sorted(int(f) for f in frames)):
        extras.append({"color": colors[order[k + 1]], "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                       "radius": 0.1, "center": list(_CORNERS[corners[k]]), "from": frame})
    plan = {"mover": mover, "direction": direction, "start": list(start), "extras": extras,
            "background": int(rng.integers(len(BACKGROUNDS))), "num_frames": num_frames}
    last = extras[-1]["color"] if extras else mover["color"]
    questions = [
        (f"which way does the {mover['color']} {mover['shape']} move?", direction, "other"),
        ("how many shapes are in the clip?", str(1 + len(extras)), "number"),
        ("what color is the shape that appears last?", last, "other"),
    ]
    return plan, questions


def draw_clip(plan: Dict[str, Any], image_size: int, rng: np.random.Generator) -> List[Image.Image]:
    """The frames of a clip ``plan`` (as stored in ``clips_attributes_{split}.json``)."""
    n = plan["num_frames"]
    dx, dy = DIRECTIONS[plan["direction"]]
    frames = []
    for t in range(n):
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[plan["background"]])
        draw = ImageDraw.Draw(image)
        step = 0.54 * t / max(1, n - 1)
        center = [plan["start"][0] + dx * step, plan["start"][1] + dy * step]
        _draw_one(draw, {**plan["mover"], "center": center}, image_size, COLORS[plan["mover"]["color"]])
        for extra in plan["extras"]:
            if t >= extra["from"]:
                _draw_one(draw, extra, image_size, COLORS[extra["color"]])
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-_NOISE, _NOISE + 1, size=(image_size, image_size, 3),
                                                                  dtype=np.int16)
        frames.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return frames


def _split(out_dir: str, kind: str, split: str, first_id: int, n: int, image_size: int, num_frames: int,
           rng: np.random.Generator) -> Dict[str, str]:
    root = os.path.join(out_dir, kind, split)
    os.makedirs(root, exist_ok=True)
    conversations, questions, annotations, attributes = [], [], [], []
    for sample_id in range(first_id, first_id + n):
        name = f"{sample_id:06d}"
        if kind == "pairs":
            a, b, asked = _pair(rng)
            names = [f"{name}_a.png", f"{name}_b.png"]
            for attrs, file_name in zip((a, b), names):
                draw_shape(attrs, image_size, rng).save(os.path.join(root, file_name), compress_level=1)
            # each image named in the text, so that "the first image" has something to point at
            visuals, markers = {"image": names}, "first image: <image>\nsecond image: <image>\n"
            attributes.append({"id": sample_id, "images": names, "first": a, "second": b})
        else:
            plan, asked = _clip_plan(rng, num_frames)
            os.makedirs(os.path.join(root, name), exist_ok=True)
            for t, frame in enumerate(draw_clip(plan, image_size, rng)):
                frame.save(os.path.join(root, name, f"{t:03d}.png"), compress_level=1)
            visuals, markers = {"video": name}, "<video>\n"
            attributes.append({"id": sample_id, "video": name, **plan})
        # a fresh order per sample: trained always in one order, a model answers the first question
        # after the images by its position, not its words (the eval asks each one first)
        asked = [asked[i] for i in rng.permutation(len(asked))]
        turns = []
        for k, (question, answer, answer_type) in enumerate(asked):
            turns.append({"from": "human", "value": (markers if k == 0 else "") + question + VQA_PROMPT_SUFFIX})
            turns.append({"from": "gpt", "value": answer})
            qid = sample_id * 10 + k
            # pairs: the question carries the images' names and markers as the conversation does
            asked_as = markers.rstrip("\n") + "\n" + question if kind == "pairs" else question
            questions.append({"question_id": qid, "image_id": sample_id, "question": asked_as, **visuals})
            annotations.append({"question_id": qid, "image_id": sample_id, "question_type": question.split()[0],
                                "answer_type": answer_type, "multiple_choice_answer": answer,
                                "answers": _annotator_answers(answer, ["unsure"], rng)})
        conversations.append({"id": name, **visuals, "conversations": turns})
    paths = {"root": root, **{f: os.path.join(out_dir, f"{kind}_{f}_{split}.json")
                              for f in ("conversations", "questions", "annotations", "attributes")}}
    common = {"data_type": "shapes", "data_subtype": f"{kind}_{split}"}
    _write_json(paths["conversations"], conversations)
    _write_json(paths["questions"], {**common, "task_type": "Open-Ended", "questions": questions})
    _write_json(paths["annotations"], {**common, "annotations": annotations})
    _write_json(paths["attributes"], attributes)
    return paths


def generate_multi_shapes(out_dir: str, kind: str, *, num_train: int = 2000, num_test: int = 200,
                          image_size: int = 64, num_frames: int = 8, seed: int = 0) -> Dict[str, Any]:
    """Write image pairs (``kind="pairs"``) or clips (``"clips"``, each a folder of
    ``num_frames`` PNG frames) under ``out_dir/kind/{split}``, with per split LLaVA
    conversations (all of a sample's questions as turns), VQAv2 questions naming their own
    images or video (read by the ``vqav2`` reader, scored by the official metric) and the
    ground truth. Pairs ask whether colour or shape match across the images and about each one;
    clips ask the direction of motion (4 ways), the shape count and the colour that appears last."""
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r}: one of {list(KINDS)}")
    if image_size < 32 or num_frames < 2 or num_train < 0 or num_test < 0:
        raise ConfigError("image_size >= 32, num_frames >= 2 and num_train, num_test >= 0 are needed")
    out_dir = os.fspath(out_dir)
    result: Dict[str, Any] = {"out_dir": out_dir, "kind": kind}
    first_id = 1
    for index, (split, n) in enumerate(zip(SPLITS, (num_train, num_test))):
        rng = np.random.default_rng([seed, index, KINDS.index(kind) + 7])
        result[split] = _split(out_dir, kind, split, first_id, n, image_size, num_frames, rng)
        first_id += n
    return result
