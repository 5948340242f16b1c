"""The synthetic "shapes" dataset: one coloured shape per image, with captions, VQA and chat data.

Small enough to generate in seconds and learnable by tiny models trained from scratch on CPU,
yet not trivial: four independent attributes (colour, shape, size, position), jittered
geometry, a slightly noisy background, and captions phrased several ways.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm.core.errors import ConfigError
from vlm.data.formats import CAPTION_PROMPT, VQA_PROMPT_SUFFIX
from vlm.data.types import IMAGE_TOKEN

COLORS = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 190),
    "orange": (250, 135, 20),
}
# extra colours for ``colors=`` (ShapesStyle); the default set is COLORS
PALETTE = {
    **COLORS,
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "cyan": (30, 200, 210),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "lime": (160, 230, 40),
    "navy": (20, 30, 110),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = ((245, 245, 245), (228, 228, 228), (242, 236, 222), (224, 232, 240))
SPLITS = ("train", "test")
IMAGE_PATTERN = "{image_id:012d}.png"

# Shape centre (fraction of the image side) and radius (fraction of the side) before jitter.
_CENTERS = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
_RADII = {"small": 0.12, "large": 0.21}
_POSITION_JITTER = 0.05  # max centre offset, fraction of the side
_SIZE_JITTER = 0.1  # radius scaled by 1 +- this
_NOISE = 4  # background/shape pixel noise, +- this per channel

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_CORNER_PHRASES = ("in the {p} corner", "at the {p}", "in the {p} of the image")
_CENTER_PHRASES = ("in the center", "in the middle", "in the center of the image")
_TEMPLATES = (
    "a {size} {color} {shape} {loc}",
    "there is a {size} {color} {shape} {loc}",
    "{loc} there is a {size} {color} {shape}",
    "the image shows a {size} {color} {shape} {loc}",
    "a {size} {shape} colored {color} {loc}",
    "a {size} {color} {shape} on a plain background {loc}",
)
QUESTION_KINDS = ("color", "shape", "size", "position", "is_color", "is_shape")
_QUESTIONS_PER_IMAGE = 3


BACKGROUND_KINDS = ("solid", "noise", "gradient")
PHRASINGS = ("default", "alt")
# question texts per phrasing: (color, shape, size, position, is_color, is_shape)
_ALT_QUESTIONS = {
    "color": "which colour does the object have?",
    "shape": "what kind of shape is shown?",
    "size": "how big is the object, large or small?",
    "position": "in which part of the picture is the object?",
    "is_color": "is the object {v}?",
    "is_shape": "does the picture contain a {v}?",
}


@dataclass(frozen=True)
class ShapesStyle:
    """How the images and questions look; the defaults give the demo's dataset byte for byte.

    ``shape_scale`` multiplies the shapes' radii (0.1-0.2 on 256-384 px images: shapes that a
    resize to a small encoder's input makes unreadable, for AnyRes tiling); ``jitter`` is the largest centre offset (a
    fraction of the side); ``shapes_per_image`` 1 or 2 (two: one in the left half, one in the
    right half, of different colours; questions name which one, "the shape on the left");
    ``background`` ``solid`` (light tones, faint noise), ``noise`` (strong pixel noise) or
    ``gradient`` (a light diagonal gradient); ``colors`` the colour names to draw from
    (``PALETTE``; None: the six of ``COLORS``); ``phrasing`` ``default`` or ``alt`` (other
    question wordings).
    """

    shape_scale: float = 1.0
    jitter: float = _POSITION_JITTER
    shapes_per_image: int = 1
    background: str = "solid"
    colors: Optional[Tuple[str, ...]] = None
    phrasing: str = "default"

    def check(self) -> None:
        """ValueError naming the first bad option."""
        if not 0.1 <= self.shape_scale <= 1.6:
            raise ConfigError(f"shape_scale must be in [0.1, 1.6], got {self.shape_scale}")
        if not 0.0 <= self.jitter <= 0.15:
            raise ConfigError(f"jitter must be in [0, 0.15], got {self.jitter}")
        if self.shapes_per_image not in (1, 2):
            raise ConfigError(f"shapes_per_image must be 1 or 2, got {self.shapes_per_image}")
        if self.background not in BACKGROUND_KINDS:
            raise ConfigError(f"background must be one of {BACKGROUND_KINDS}, got {self.background!r}")
        if self.phrasing not in PHRASINGS:
            raise ConfigError(f"phrasing must be one of {PHRASINGS}, got {self.phrasing!r}")
        if self.colors is not None:
            unknown = [c for c in self.colors if c not in PALETTE]
            if unknown or len(set(self.colors)) < 2:
                raise ConfigError(f"colors: at least two distinct names from {sorted(PALETTE)}; "
                                 f"unknown {unknown}" if unknown else "colors: at least two distinct names")

    @property
    def palette(self) -> Dict[str, Tuple[int, int, int]]:
        """The colours drawn from, name -> RGB."""
        return COLORS if self.colors is None else {c: PALETTE[c] for c in self.colors}


DEFAULT_STYLE = ShapesStyle()


def _choice(rng: np.random.Generator, options) -> Any:
    return options[int(rng.integers(len(options)))]


def _sample_attributes(rng: np.random.Generator, style: ShapesStyle = DEFAULT_STYLE) -> Dict[str, Any]:
    """Attributes of one image, each drawn independently, plus its jittered geometry."""
    a = {
        "color": _choice(rng, list(style.palette)),
        "shape": _choice(rng, SHAPES),
        "size": _choice(rng, SIZES),
        "position": _choice(rng, POSITIONS),
        "background": int(rng.integers(len(BACKGROUNDS))),
    }
    cx, cy = _CENTERS[a["position"]]
    dx, dy = rng.uniform(-style.jitter, style.jitter, size=2)
    a["center"] = [round(cx + dx, 4), round(cy + dy, 4)]
    radius = _RADII[a["size"]] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    a["radius"] = round(radius * style.shape_scale, 4)
    if style.shapes_per_image == 2:
        a.update(_second_shape(a, rng, style))
    return a


_SIDES = ("left", "right")


def _second_shape(a: Dict[str, Any], rng: np.random.Generator, style: ShapesStyle) -> Dict[str, Any]:
    """Two shapes, one per half of the image (the first one's position word becomes its side),
    of different colours: ``objects`` lists both, left first."""
    objects = []
    colors = [a["color"], _choice(rng, [c for c in style.palette if c != a["color"]])]
    for side, color in zip(_SIDES, colors):
        shape = a["shape"] if side == "left" else _choice(rng, SHAPES)
        size = a["size"] if side == "left" else _choice(rng, SIZES)
        radius = _RADII[size] * style.shape_scale * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
        radius = min(radius, 0.2)  # two shapes must fit side by side
        cx = (0.27 if side == "left" else 0.73) + rng.uniform(-style.jitter, style.jitter) / 2
        cy = 0.5 + rng.uniform(-0.2, 0.2)
        objects.append({"side": side, "color": color, "shape": shape, "size": size,
                        "center": [round(cx, 4), round(cy, 4)], "radius": round(radius, 4)})
    return {"objects": objects, "position": "left", "center": objects[0]["center"],
            "radius": objects[0]["radius"]}


def draw_shape(
    attributes: Dict[str, Any], image_size: int, rng: np.random.Generator,
    style: ShapesStyle = DEFAULT_STYLE,
) -> Image.Image:
    """Render one image from `attributes` (as stored in ``attributes_{split}.json``)."""
    s = image_size
    image = Image.new("RGB", (s, s), BACKGROUNDS[attributes["background"]])
    if style.background == "gradient":
        image = _gradient(BACKGROUNDS[attributes["background"]], s)
    draw = ImageDraw.Draw(image)
    for obj in attributes.get("objects") or [attributes]:
        _draw_one(draw, obj, s, PALETTE[obj["color"]])
    pixels = np.asarray(image, dtype=np.int16)
    noise = _NOISE if style.background != "noise" else 24
    pixels = pixels + rng.integers(-noise, noise + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _gradient(base: Tuple[int, int, int], size: int) -> Image.Image:
    """A diagonal gradient from ``base`` to a darker tone of it."""
    t = np.add.outer(np.arange(size), np.arange(size)) / max(1, 2 * (size - 1))
    dark = np.array(base) * 0.7
    pixels = (1 - t)[..., None] * np.array(base) + t[..., None] * dark
    return Image.fromarray(pixels.astype(np.uint8))


def _draw_one(draw: ImageDraw.ImageDraw, attributes: Dict[str, Any], s: int, fill) -> None:
    """Draw one shape (``shape``, ``center``, ``radius``) filled with ``fill``."""
    cx, cy = attributes["center"][0] * s, attributes["center"][1] * s
    r = attributes["radius"] * s
    shape = attributes["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = 0.85 * r  # a square as wide as the circle looks bigger; shrink to similar area
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # equilateral, pointing up, inscribed in the circle of radius r
        draw.polygon(
            [(cx, cy - r), (cx - 0.866 * r, cy + 0.5 * r), (cx + 0.866 * r, cy + 0.5 * r)],
            fill=fill,
        )
    elif shape == "cross":
        # PIL rectangles include both edges (+1 px), which would make small crosses blobby
        w = 0.3 * r - 0.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape '{shape}'")


def _captions(a: Dict[str, Any], n: int, rng: np.random.Generator) -> List[str]:
    """`n` captions, each naming size, colour, shape and position, from distinct templates
    while there are enough of them."""
    if a.get("objects"):
        return _captions_two(a["objects"], n, rng)
    order = list(rng.permutation(len(_TEMPLATES)))
    while len(order) < n:
        order += list(rng.permutation(len(_TEMPLATES)))
    phrases = _CENTER_PHRASES if a["position"] == "center" else _CORNER_PHRASES
    captions = []
    for t in order[:n]:
        loc = _choice(rng, phrases).format(p=a["position"])
        size = _choice(rng, _SIZE_WORDS[a["size"]])
        captions.append(
            _TEMPLATES[t].format(size=size, color=a["color"], shape=a["shape"], loc=loc).strip()
        )
    return captions


_TWO_TEMPLATES = (
    "a {s0} {c0} {h0} on the left and a {s1} {c1} {h1} on the right",
    "on the left a {s0} {c0} {h0}, on the right a {s1} {c1} {h1}",
    "there is a {s0} {c0} {h0} on the left and a {s1} {c1} {h1} on the right",
    "a {s1} {c1} {h1} on the right and a {s0} {c0} {h0} on the left",
)


def _captions_two(objects: List[Dict[str, Any]], n: int, rng: np.random.Generator) -> List[str]:
    """`n` captions of a two-shape image, naming each shape's size, colour, shape and side."""
    order = list(rng.permutation(len(_TWO_TEMPLATES)))
    while len(order) < n:
        order += list(rng.permutation(len(_TWO_TEMPLATES)))
    fields = {}
    for i, o in enumerate(objects):
        fields.update({f"s{i}": _choice(rng, _SIZE_WORDS[o["size"]]), f"c{i}": o["color"], f"h{i}": o["shape"]})
    return [_TWO_TEMPLATES[t].format(**fields) for t in order[:n]]


def _question_two(kind: str, a: Dict[str, Any], rng: np.random.Generator,
                  style: ShapesStyle) -> Dict[str, Any]:
    """A question about one of two shapes, naming it by its side ("the shape on the left"), or
    (``position``) asking for the side of the shape of a colour."""
    obj = a["objects"][int(rng.integers(2))]
    side = obj["side"]
    alt = style.phrasing == "alt"
    if kind == "position":
        text = (f"on which side is the {obj['color']} object?" if alt
                else f"where is the {obj['color']} shape?")
        return dict(question=text, answer=side, answer_type="other", question_type="where is the",
                    wrong=[s for s in _SIDES if s != side])
    if kind in ("is_color", "is_shape"):
        key, values = ("color", list(style.palette)) if kind == "is_color" else ("shape", list(SHAPES))
        yes = bool(rng.random() < 0.5)
        asked = obj[key] if yes else _choice(rng, [v for v in values if v != obj[key]])
        if kind == "is_color":
            text = f"is the object on the {side} {asked}?" if alt else f"is the shape on the {side} {asked}?"
        else:
            text = f"is the {side} object a {asked}?" if alt else f"is there a {asked} on the {side}?"
        return dict(question=text, answer="yes" if yes else "no", answer_type="yes/no",
                    question_type="is the" if kind == "is_color" else "is there a",
                    wrong=["no" if yes else "yes"])
    values = {"color": list(style.palette), "shape": list(SHAPES), "size": list(SIZES)}[kind]
    text = {
        "color": f"which colour does the object on the {side} have?" if alt else f"what color is the shape on the {side}?",
        "shape": f"what kind of shape is on the {side}?" if alt else f"what shape is on the {side}?",
        "size": f"how big is the object on the {side}, large or small?" if alt else f"is the shape on the {side} large or small?",
    }[kind]
    qtype = {"color": "what color is the", "shape": "what shape is", "size": "is the"}[kind]
    return dict(question=text, answer=obj[kind], answer_type="other", question_type=qtype,
                wrong=[v for v in values if v != obj[kind]])


def _question(kind: str, a: Dict[str, Any], rng: np.random.Generator,
              style: ShapesStyle = DEFAULT_STYLE) -> Dict[str, Any]:
    """One question of `kind` about `a`: text, answer, answer type, question type and the
    plausible wrong answers (used for annotator noise)."""
    if a.get("objects"):
        return _question_two(kind, a, rng, style)
    alt = style.phrasing == "alt"
    if kind in ("is_color", "is_shape"):
        key, values = ("color", list(style.palette)) if kind == "is_color" else ("shape", list(SHAPES))
        yes = bool(rng.random() < 0.5)
        asked = a[key] if yes else _choice(rng, [v for v in values if v != a[key]])
        text = (
            f"is the shape {asked}?" if kind == "is_color" else f"is there a {asked} in the image?"
        )
        if alt:
            text = _ALT_QUESTIONS[kind].format(v=asked)
        qtype = "is the" if kind == "is_color" else "is there a"
        answer = "yes" if yes else "no"
        return dict(
            question=text,
            answer=answer,
            answer_type="yes/no",
            question_type=qtype,
            wrong=["no" if yes else "yes"],
        )
    text, qtype, values = {
        "color": ("what color is the shape?", "what color is the", list(style.palette)),
        "shape": ("what shape is in the image?", "what shape is", list(SHAPES)),
        "size": ("is the shape large or small?", "is the", list(SIZES)),
        "position": ("where is the shape?", "where is the", list(POSITIONS)),
    }[kind]
    answer = a[kind]
    if alt:
        text = _ALT_QUESTIONS[kind]
    return dict(
        question=text,
        answer=answer,
        answer_type="other",
        question_type=qtype,
        wrong=[v for v in values if v != answer],
    )


def _annotator_answers(answer: str, wrong: List[str], rng: np.random.Generator) -> List[dict]:
    """10 VQA answers: mostly `answer`, 0-2 spelling variants that normalise to it ("Red",
    "red."), and rarely one wrong answer, so `answer` always scores 100% (>= 3 matches)."""
    answers = [answer] * 10
    n_variants = int(rng.integers(0, 3))
    slots = rng.choice(10, size=n_variants + 1, replace=False)
    for slot in slots[:n_variants]:
        answers[slot] = _choice(rng, (answer.capitalize(), answer + "."))
    confidence = ["yes"] * 10
    if rng.random() < 0.15:
        answers[slots[-1]] = _choice(rng, wrong)
        confidence[slots[-1]] = "maybe"
    return [
        {"answer": ans, "answer_confidence": conf, "answer_id": i + 1}
        for i, (ans, conf) in enumerate(zip(answers, confidence))
    ]


def _conversation(a: Dict[str, Any], captions: List[str], rng: np.random.Generator,
                  style: ShapesStyle = DEFAULT_STYLE) -> List[dict]:
    """A LLaVA conversation of 2-4 rounds: one "describe" round and distinct question kinds,
    in random order. Short-answer questions carry the VQA prompt suffix (as in LLaVA-1.5)."""
    n_rounds = int(rng.integers(2, 5))
    kinds = ["caption"] + [str(k) for k in rng.choice(QUESTION_KINDS, n_rounds - 1, replace=False)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))]
    turns = []
    for kind in kinds:
        if kind == "caption":
            prompt, answer = CAPTION_PROMPT, _choice(rng, captions)
        else:
            q = _question(kind, a, rng, style)
            prompt, answer = q["question"] + VQA_PROMPT_SUFFIX, q["answer"]
        turns += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    turns[0]["value"] = f"{IMAGE_TOKEN}\n" + turns[0]["value"]
    return turns


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj))  # dumps uses the C encoder; dump would stream in Python


def _generate_split(
    out_dir: str,
    split: str,
    first_id: int,
    n: int,
    image_size: int,
    rng: np.random.Generator,
    captions_per_image: int,
    progress: bool,
    style: ShapesStyle = DEFAULT_STYLE,
) -> Dict[str, str]:
    image_root = os.path.join(out_dir, "images", split)
    os.makedirs(image_root, exist_ok=True)
    subtype = f"shapes_{split}"
    images, captions, attributes, conversations = [], [], [], []
    questions, answers, texts = [], [], []
    for image_id in tqdm(
        range(first_id, first_id + n), desc=f"shapes {split}", disable=not progress
    ):
        a = _sample_attributes(rng, style)
        file_name = IMAGE_PATTERN.format(image_id=image_id)
        draw_shape(a, image_size, rng, style).save(os.path.join(image_root, file_name), compress_level=1)
        attributes.append({"image_id": image_id, "file_name": file_name, **a})
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )

        caps = _captions(a, captions_per_image, rng)
        # text lines pair a description with a paraphrase or a question about it, so that a
        # language model warmed up on them learns to read its context, not just to babble
        for i, caption in enumerate(caps):
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": caption})
            texts.append({"text": f"{caption}. {caps[(i + 1) % len(caps)]}"})

        for k, kind in enumerate(rng.choice(QUESTION_KINDS, _QUESTIONS_PER_IMAGE, replace=False)):
            q = _question(str(kind), a, rng, style)
            qid = image_id * 1000 + k  # the VQAv2 convention
            questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
            answers.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": q["question_type"],
                    "answer_type": q["answer_type"],
                    "multiple_choice_answer": q["answer"],
                    "answers": _annotator_answers(q["answer"], q["wrong"], rng),
                }
            )
            texts.append({"text": f"{caps[k % len(caps)]}. {q['question']} {q['answer']}"})

        conversations.append(
            {"id": str(image_id), "image": file_name, "conversations": _conversation(a, caps, rng, style)}
        )

    info = {"description": f"synthetic shapes dataset ({split} split)", "version": "1.0"}
    paths = {
        "image_root": image_root,
        "captions": os.path.join(out_dir, f"captions_{split}.json"),
        "questions": os.path.join(out_dir, f"questions_{split}.json"),
        "annotations": os.path.join(out_dir, f"annotations_{split}.json"),
        "conversations": os.path.join(out_dir, f"conversations_{split}.json"),
        "text": os.path.join(out_dir, f"text_{split}.jsonl"),
        "attributes": os.path.join(out_dir, f"attributes_{split}.json"),
        "image_pattern": IMAGE_PATTERN,
    }
    _write_json(
        paths["captions"],
        {
            "info": info,
            "licenses": [],
            "type": "captions",
            "images": images,
            "annotations": captions,
        },
    )
    common = {
        "info": info,
        "license": {"name": "synthetic"},
        "data_type": "shapes",
        "data_subtype": subtype,
    }
    _write_json(paths["questions"], {**common, "task_type": "Open-Ended", "questions": questions})
    _write_json(paths["annotations"], {**common, "annotations": answers})
    _write_json(paths["conversations"], conversations)
    _write_json(paths["attributes"], attributes)
    with open(paths["text"], "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts)
    return paths


def generate_shapes(
    out_dir: str,
    *,
    num_train: int = 2000,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 5,
    progress: bool = True,
    style: ShapesStyle = DEFAULT_STYLE,
) -> Dict[str, Any]:
    """Write the shapes dataset under `out_dir` and return the paths written.

    Layout, for each split in (train, test)::

        images/{split}/{image_id:012d}.png   image ids 1..num_train (train), then test's
        captions_{split}.json       official COCO captions format (file_name relative to
                                    images/{split})
        questions_{split}.json      official VQAv2 questions (data_subtype "shapes_{split}")
        annotations_{split}.json    official VQAv2 annotations, 10 answers per question
        conversations_{split}.json  LLaVA conversations (image relative to images/{split})
        text_{split}.jsonl          text-only {"text": ...} lines: "caption. paraphrase" and "caption. question answer"
        attributes_{split}.json     ground-truth attributes and geometry of every image

    Read them back with::

        read_coco_captions(p["train"]["captions"], p["train"]["image_root"])
        read_vqav2(p["test"]["questions"], p["test"]["annotations"], p["test"]["image_root"],
                   image_pattern=p["image_pattern"])          # "{image_id:012d}.png"
        read_llava_json(p["train"]["conversations"], p["train"]["image_root"])
        read_jsonl(p["train"]["text"])

    Returns ``{"out_dir", "image_pattern", "train": {...}, "test": {...}}`` where each split
    maps image_root, captions, questions, annotations, conversations, text, attributes and
    image_pattern to paths. The same seed gives identical files; the test split draws from a
    different random stream than train. ``style`` (:class:`ShapesStyle`) makes datasets unlike
    the demo's; its defaults write exactly the demo's files.
    """
    if num_train < 0 or num_test < 0:
        raise ConfigError("num_train and num_test must be >= 0")
    if image_size < 32:
        raise ConfigError(
            f"image_size must be >= 32 for the shapes to stay recognisable, got {image_size}"
        )
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be >= 1, got {captions_per_image}")
    style.check()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    result: Dict[str, Any] = {"out_dir": out_dir, "image_pattern": IMAGE_PATTERN}
    first_id = 1
    for split_index, (split, n) in enumerate(zip(SPLITS, (num_train, num_test))):
        rng = np.random.default_rng([seed, split_index])
        result[split] = _generate_split(
            out_dir, split, first_id, n, image_size, rng, captions_per_image, progress, style
        )
        first_id += n
    return result
