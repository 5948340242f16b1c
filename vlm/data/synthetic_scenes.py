"""Shapes scenes: several shapes per image, with COCO instances for POPE and yes/no data.

The scene variant of the synthetic shapes dataset (``vlm data shapes --scene-shapes MIN-MAX``). An
*object* is a shape kind (``circle``, ``ring``, ...): a scene draws MIN to MAX distinct kinds, each
in a colour of the style's palette, at a size and place of its own, none touching another. Kinds are
not drawn uniformly, so that POPE's three negative samplings differ: some kinds are more frequent
than others (``popular``), and each kind has a partner it often appears with (``adversarial``:
circle-ring, square-diamond, triangle-semicircle, cross-bar).

Besides the files of :func:`vlm.data.synthetic.generate_shapes` (captions naming every object, VQA
questions and conversations), each split has ``instances_{split}.json``: COCO instances (``images``,
``categories`` = the kinds, ``annotations`` with ``category_id``, ``bbox`` ``[x, y, w, h]`` in pixels,
the drawn shape's extent, ``area`` its pixel count, and its ``color``). The questions are POPE's own
(``"Is there a {kind} in the image?"``), balanced yes/no, their negatives drawn by the three
samplings in turn (``vlm.data.pope``), so an instruction-tuned model can be trained on them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm.core.errors import ConfigError
from vlm.data import pope
from vlm.data.formats import CAPTION_PROMPT, VQA_PROMPT_SUFFIX
from vlm.data.synthetic import (
    _NOISE,
    BACKGROUNDS,
    DEFAULT_STYLE,
    IMAGE_PATTERN,
    PALETTE,
    SHAPES,
    SPLITS,
    ShapesStyle,
    _annotator_answers,
    _draw_one,
    _gradient,
    _write_json,
)
from vlm.data.types import IMAGE_TOKEN

SCENE_SHAPES = SHAPES + ("diamond", "ring", "bar", "semicircle")
# how often each kind is drawn (relative): the "popular" ones first
_WEIGHTS = {"circle": 5, "square": 4, "triangle": 4, "cross": 3, "diamond": 2, "ring": 2, "bar": 1, "semicircle": 1}
PARTNERS = {"circle": "ring", "ring": "circle", "square": "diamond", "diamond": "square",
            "triangle": "semicircle", "semicircle": "triangle", "cross": "bar", "bar": "cross"}
_PARTNER_PROB = 0.6  # a further kind is a present kind's partner this often
MAX_SHAPES = 5
_RADIUS = (0.09, 0.13)  # fraction of the side, times the style's shape_scale (capped)
_GAP = 0.03  # the least distance between two shapes' circles, fraction of the side
_YES_PER_IMAGE = 2  # existence questions per image: this many "yes", as many "no"
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
_TEMPLATES = (
    "{objects}",
    "there is {objects}",
    "the image shows {objects}",
    "{count} shapes: {objects}",
    "{objects} on a plain background",
)


def parse_range(text: str, where: str = "--scene-shapes") -> Tuple[int, int]:
    """``"MIN-MAX"`` (or one number) -> ``(MIN, MAX)``, 1 <= MIN <= MAX <= 5; ConfigError otherwise."""
    parts = str(text).split("-")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if not 1 <= lo <= hi <= MAX_SHAPES:
        raise ConfigError(f"{where}: MIN-MAX shapes per image with 1 <= MIN <= MAX <= {MAX_SHAPES} "
                          f"(e.g. 2-4), got {text!r}")
    return lo, hi


def _kinds(rng: np.random.Generator, n: int) -> List[str]:
    """``n`` distinct kinds: weighted draws, each further one often a present kind's partner."""
    kinds: List[str] = []
    while len(kinds) < n:
        partners = [PARTNERS[k] for k in kinds if PARTNERS[k] not in kinds]
        if partners and rng.random() < _PARTNER_PROB:
            kinds.append(partners[int(rng.integers(len(partners)))])
            continue
        free = [k for k in SCENE_SHAPES if k not in kinds]
        w = np.array([_WEIGHTS[k] for k in free], dtype=float)
        kinds.append(free[int(rng.choice(len(free), p=w / w.sum()))])
    return kinds


def _layout(rng: np.random.Generator, n: int, scale: float) -> List[Tuple[List[float], float]]:
    """``n`` (centre, radius) pairs, fractions of the side, whose circles keep ``_GAP`` apart
    (each failed round of 200 tries shrinks the shapes a little)."""
    while True:
        placed: List[Tuple[np.ndarray, float]] = []
        for _ in range(200):
            r = min(rng.uniform(*_RADIUS) * scale, 0.16)
            c = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            if all(np.hypot(*(c - c2)) >= r + r2 + _GAP for c2, r2 in placed):
                placed.append((c, r))
                if len(placed) == n:
                    return [([round(float(c[0]), 4), round(float(c[1]), 4)], round(float(r), 4)) for c, r in placed]
        scale *= 0.95


def sample_scene(rng: np.random.Generator, lo: int, hi: int, style: ShapesStyle = DEFAULT_STYLE) -> Dict[str, Any]:
    """One scene's attributes: ``background`` and ``objects`` (``shape``, ``color``, ``center``, ``radius``)."""
    n = int(rng.integers(lo, hi + 1))
    kinds = _kinds(rng, n)
    colors = list(style.palette)
    layout = _layout(rng, n, style.shape_scale)
    return {"background": int(rng.integers(len(BACKGROUNDS))),
            "objects": [{"shape": k, "color": colors[int(rng.integers(len(colors)))], "center": c, "radius": r}
                        for k, (c, r) in zip(kinds, layout)]}


def _draw_kind(draw: ImageDraw.ImageDraw, obj: Dict[str, Any], s: int, fill) -> None:
    """Draw one shape of any scene kind (the four of the shapes dataset as it draws them)."""
    if obj["shape"] in SHAPES:
        _draw_one(draw, obj, s, fill)
        return
    cx, cy, r = obj["center"][0] * s, obj["center"][1] * s, obj["radius"] * s
    kind = obj["shape"]
    if kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)], fill=fill)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.35 * r)))
    elif kind == "bar":
        draw.rectangle([cx - r, cy - 0.35 * r, cx + r, cy + 0.35 * r], fill=fill)
    elif kind == "semicircle":  # the upper half of a disc, its box centred
        draw.pieslice([cx - r, cy - 0.5 * r, cx + r, cy + 1.5 * r], 180, 360, fill=fill)
    else:
        raise ValueError(f"unknown shape '{kind}'")


def draw_scene(scene: Dict[str, Any], image_size: int, rng: np.random.Generator,
               style: ShapesStyle = DEFAULT_STYLE) -> Tuple[Image.Image, List[Tuple[List[int], int]]]:
    """The image of ``scene`` and each object's ``(bbox [x, y, w, h], pixel area)`` as drawn."""
    s = image_size
    base = BACKGROUNDS[scene["background"]]
    image = _gradient(base, s) if style.background == "gradient" else Image.new("RGB", (s, s), base)
    draw = ImageDraw.Draw(image)
    boxes = []
    for obj in scene["objects"]:
        _draw_kind(draw, obj, s, PALETTE[obj["color"]])
        mask = Image.new("L", (s, s), 0)
        _draw_kind(ImageDraw.Draw(mask), obj, s, 255)
        x0, y0, x1, y1 = mask.getbbox()
        boxes.append(([x0, y0, x1 - x0, y1 - y0], int(np.count_nonzero(np.asarray(mask)))))
    pixels = np.asarray(image, dtype=np.int16)
    noise = _NOISE if style.background != "noise" else 24
    pixels = pixels + rng.integers(-noise, noise + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), boxes


def _listing(objects: Sequence[Dict[str, Any]]) -> str:
    names = [f"{'an' if o['color'][0] in 'aeiou' else 'a'} {o['color']} {o['shape']}" for o in objects]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def scene_captions(scene: Dict[str, Any], n: int, rng: np.random.Generator) -> List[str]:
    """``n`` captions, each naming every object with its colour, in varied orders and phrasings."""
    objects = scene["objects"]
    templates = [t for t in _TEMPLATES if "{count}" not in t or len(objects) in _COUNT_WORDS]
    captions = []
    for i in range(n):
        t = templates[int(rng.integers(len(templates)))]
        order = [objects[int(j)] for j in rng.permutation(len(objects))]
        captions.append(t.format(objects=_listing(order), count=_COUNT_WORDS.get(len(objects), "")))
    return captions


def _split_questions(images: List[pope.ImageObjects], seed: int) -> Dict[int, List[pope.PopeQuestion]]:
    """Each image's existence questions: those of POPE split ``i % 3`` for the ``i``-th image."""
    by_split = {s: pope.build_pope(images, s, num_per_image=_YES_PER_IMAGE, seed=seed) for s in pope.POPE_SPLITS}
    chosen = {im.image_id: pope.POPE_SPLITS[i % 3] for i, im in enumerate(images)}
    result: Dict[int, List[pope.PopeQuestion]] = {im.image_id: [] for im in images}
    for split, questions in by_split.items():
        for q in questions:
            if chosen[q.image_id] == split:
                result[q.image_id].append(q)
    return result


def _generate_split(out_dir: str, split: str, first_id: int, n: int, image_size: int, rng: np.random.Generator,
                    shapes: Tuple[int, int], captions_per_image: int, progress: bool, seed: int,
                    style: ShapesStyle) -> Dict[str, str]:
    image_root = os.path.join(out_dir, "images", split)
    os.makedirs(image_root, exist_ok=True)
    images, instances, captions, attributes, scenes = [], [], [], [], []
    for image_id in tqdm(range(first_id, first_id + n), desc=f"scenes {split}", disable=not progress):
        scene = sample_scene(rng, *shapes, style)
        file_name = IMAGE_PATTERN.format(image_id=image_id)
        image, boxes = draw_scene(scene, image_size, rng, style)
        image.save(os.path.join(image_root, file_name), compress_level=1)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj, (bbox, area) in zip(scene["objects"], boxes):
            instances.append({"id": len(instances) + 1, "image_id": image_id,
                              "category_id": SCENE_SHAPES.index(obj["shape"]) + 1, "bbox": bbox, "area": area,
                              "iscrowd": 0, "color": obj["color"]})
        caps = scene_captions(scene, captions_per_image, rng)
        captions += [{"id": len(captions) + k + 1, "image_id": image_id, "caption": c} for k, c in enumerate(caps)]
        attributes.append({"image_id": image_id, "file_name": file_name, **scene})
        scenes.append((image_id, file_name, scene, caps))

    asked = _split_questions([pope.ImageObjects(i, f, tuple(o["shape"] for o in s["objects"]))
                              for i, f, s, _ in scenes], seed)
    questions, answers, conversations, texts = [], [], [], []
    for image_id, file_name, scene, caps in scenes:
        texts += [{"text": f"{c}. {caps[(k + 1) % len(caps)]}"} for k, c in enumerate(caps)]
        turns = [(CAPTION_PROMPT, caps[0])]
        for k, q in enumerate(asked[image_id]):
            qid = image_id * 1000 + k  # the VQAv2 convention
            wrong = ["no" if q.label == "yes" else "yes"]
            questions.append({"image_id": image_id, "question": q.text, "question_id": qid})
            answers.append({"question_id": qid, "image_id": image_id, "question_type": "is there a",
                            "answer_type": "yes/no", "multiple_choice_answer": q.label,
                            "answers": _annotator_answers(q.label, wrong, rng)})
            texts.append({"text": f"{caps[k % len(caps)]}. {q.text} {q.label}"})
            turns.append((q.text + VQA_PROMPT_SUFFIX, q.label))
        keep = [turns[0]] + [turns[1 + int(j)] for j in rng.permutation(len(turns) - 1)[: int(rng.integers(1, 4))]]
        keep = [keep[int(j)] for j in rng.permutation(len(keep))]
        conv = [t for prompt, answer in keep
                for t in ({"from": "human", "value": prompt}, {"from": "gpt", "value": answer})]
        conv[0]["value"] = f"{IMAGE_TOKEN}\n" + conv[0]["value"]
        conversations.append({"id": str(image_id), "image": file_name, "conversations": conv})

    info = {"description": f"synthetic shapes scenes ({split} split)", "version": "1.0"}
    paths = {name: os.path.join(out_dir, f"{name}_{split}.json")
             for name in ("captions", "instances", "questions", "annotations", "conversations", "attributes")}
    paths.update(image_root=image_root, text=os.path.join(out_dir, f"text_{split}.jsonl"), image_pattern=IMAGE_PATTERN)
    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(SCENE_SHAPES)]
    _write_json(paths["captions"], {"info": info, "licenses": [], "type": "captions", "images": images,
                                    "annotations": captions})
    _write_json(paths["instances"], {"info": info, "licenses": [], "images": images, "categories": categories,
                                     "annotations": instances})
    common = {"info": info, "license": {"name": "synthetic"}, "data_type": "shapes", "data_subtype": f"scenes_{split}"}
    _write_json(paths["questions"], {**common, "task_type": "Open-Ended", "questions": questions})
    _write_json(paths["annotations"], {**common, "annotations": answers})
    _write_json(paths["conversations"], conversations)
    _write_json(paths["attributes"], attributes)
    with open(paths["text"], "w", encoding="utf-8") as f:
        f.writelines(json_line + "\n" for json_line in map(json.dumps, texts))
    return paths


def generate_scenes(
    out_dir: str,
    *,
    shapes_per_image: Tuple[int, int] = (2, 4),
    num_train: int = 2000,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 5,
    progress: bool = True,
    style: ShapesStyle = DEFAULT_STYLE,
) -> Dict[str, Any]:
    """Write the scenes dataset under ``out_dir`` (the layout of
    :func:`vlm.data.synthetic.generate_shapes`, plus ``instances_{split}.json``) and return the
    paths written, as ``generate_shapes`` does. Each image has ``shapes_per_image`` = (MIN, MAX)
    distinct shape kinds; its questions are 2 "yes" and 2 "no" existence questions when it can
    have them. The same seed gives identical files."""
    lo, hi = parse_range(f"{shapes_per_image[0]}-{shapes_per_image[1]}", "shapes_per_image")
    if num_train < 0 or num_test < 0:
        raise ConfigError("num_train and num_test must be >= 0")
    if image_size < 48:
        raise ConfigError(f"image_size must be >= 48 for several shapes to stay recognisable, got {image_size}")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be >= 1, got {captions_per_image}")
    style.check()
    if style.shapes_per_image != 1:
        raise ConfigError("shapes_per_image (the two-halves layout) does not combine with scenes")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    result: Dict[str, Any] = {"out_dir": out_dir, "image_pattern": IMAGE_PATTERN}
    first_id = 1
    for split_index, (split, n) in enumerate(zip(SPLITS, (num_train, num_test))):
        rng = np.random.default_rng([seed, split_index, 22])
        result[split] = _generate_split(out_dir, split, first_id, n, image_size, rng, (lo, hi), captions_per_image,
                                        progress, seed, style)
        first_id += n
    return result
