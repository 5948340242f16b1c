"""POPE questions: yes/no object-existence questions with random, popular and adversarial negatives.

POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models",
github.com/RUCAIBox/POPE) asks "Is there a {object} in the image?" about each image: up to N of its
ground-truth objects ("yes"), each followed by one object that is not in the image ("no"), chosen
one of three ways (the splits):

- ``random``: any object of the dataset;
- ``popular``: the dataset's most frequent objects first (counted in images);
- ``adversarial``: the objects that co-occur most often with that "yes" object first.

A negative is never one of the image's objects nor an object already asked about the image. Ties
in the frequency orders break by name, and the random draws come from ``numpy``'s generator seeded
with ``(seed, split index)``, so the same inputs and seed give the same questions. The objects of
an image come from COCO instance annotations (its categories' names, in the order of their first
annotation) or from captions (the words of a vocabulary that the captions mention). Written from
the paper and the official build code's behaviour, not copied from it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.json_positions import item_line

POPE_SPLITS = ("random", "popular", "adversarial")
POPE_TEMPLATE = "Is there a {} in the image?"
SOURCES = ("instances", "captions")


@dataclass(frozen=True)
class ImageObjects:
    """One image and the distinct objects in it, in the order they are asked about."""

    image_id: int
    file_name: str
    objects: Tuple[str, ...]


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: ``label`` is ``"yes"`` (``object`` is in the image) or ``"no"``."""

    question_id: int
    split: str
    image_id: int
    file_name: str
    object: str
    text: str
    label: str


def _load(path: str) -> object:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except OSError as e:
        raise DataFormatError(f"{path}: cannot read the annotations file: {e.strerror}") from None


class _Place:
    """``path:line: key[index]``, a list item's place, its line looked up only when written."""

    def __init__(self, path: str, key: str, index: int):
        self.path, self.key, self.index = path, key, index

    def __str__(self) -> str:
        line = item_line(self.path, self.key, self.index)
        return f"{self.path}{'' if line is None else f':{line}'}: {self.key}[{self.index}]"


def _list(data: object, key: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataFormatError(f"{path}: expected an object with a list '{key}' (a COCO file); found {found}")
    return data[key]


def _field(record: object, key: str, types, where: _Place):
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise DataFormatError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataFormatError(f"{where}: field '{key}' has type {type(value).__name__}")
    return value


def _images(data: object, path: str) -> Dict[int, str]:
    images: Dict[int, str] = {}
    for i, im in enumerate(_list(data, "images", path)):
        where = _Place(path, "images", i)
        image_id = _field(im, "id", int, where)
        if image_id in images:
            raise DataFormatError(f"{where}: duplicate image id {image_id}")
        images[image_id] = _field(im, "file_name", str, where)
    return images


def objects_from_instances(path: str | os.PathLike) -> List[ImageObjects]:
    """Each image of a COCO instances file with the names of its annotations' categories
    (distinct, in the order of their first annotation); images without annotations are left out."""
    path = os.fspath(path)
    data = _load(path)
    images = _images(data, path)
    categories: Dict[int, str] = {}
    for i, cat in enumerate(_list(data, "categories", path)):
        where = _Place(path, "categories", i)
        categories[_field(cat, "id", int, where)] = _field(cat, "name", str, where)
    found: Dict[int, List[str]] = {}
    for i, ann in enumerate(_list(data, "annotations", path)):
        where = _Place(path, "annotations", i)
        image_id = _field(ann, "image_id", int, where)
        category_id = _field(ann, "category_id", int, where)
        if image_id not in images:
            raise DataFormatError(f"{where}: image_id {image_id} is not among the file's images")
        if category_id not in categories:
            raise DataFormatError(f"{where}: category_id {category_id} is not among the file's categories")
        names = found.setdefault(image_id, [])
        if categories[category_id] not in names:
            names.append(categories[category_id])
    return [ImageObjects(i, images[i], tuple(found[i])) for i in images if i in found]


def _mention(word: str) -> re.Pattern:
    """The word or its plural ("-s", "-es") as a whole word, case-insensitive."""
    return re.compile(rf"\b{re.escape(word.lower())}(?:s|es)?\b")


def objects_from_captions(path: str | os.PathLike, vocabulary: Sequence[str]) -> List[ImageObjects]:
    """Each image of a COCO captions file with the vocabulary words its captions mention (whole
    words, singular or plural, case-insensitive), in the order of their first mention; images
    whose captions mention none are left out."""
    path = os.fspath(path)
    if isinstance(vocabulary, str) or not vocabulary or not all(isinstance(w, str) and w for w in vocabulary):
        raise ConfigError(f"vocabulary: a list of object names (words) is needed to find objects in the captions "
                          f"of {path}, got {vocabulary!r}")
    data = _load(path)
    images = _images(data, path)
    texts: Dict[int, List[str]] = {}
    for i, ann in enumerate(_list(data, "annotations", path)):
        where = _Place(path, "annotations", i)
        image_id = _field(ann, "image_id", int, where)
        if image_id not in images:
            raise DataFormatError(f"{where}: image_id {image_id} is not among the file's images")
        texts.setdefault(image_id, []).append(_field(ann, "caption", str, where).lower())
    patterns = [(w, _mention(w)) for w in dict.fromkeys(vocabulary)]
    result = []
    for image_id, file_name in images.items():
        text = " . ".join(texts.get(image_id, []))
        hits = sorted((m.start(), w) for w, p in patterns for m in [p.search(text)] if m)
        if hits:
            result.append(ImageObjects(image_id, file_name, tuple(w for _, w in hits)))
    return result


def frequency_order(images: Iterable[ImageObjects]) -> List[str]:
    """Every object, the one found in most images first (ties by name)."""
    counts = Counter(o for im in images for o in im.objects)
    return sorted(counts, key=lambda o: (-counts[o], o))


def co_occurrence_order(images: Iterable[ImageObjects]) -> Dict[str, List[str]]:
    """For each object, the other objects in the order of how many images they share with it
    (most first, ties by name); objects never seen together are not listed."""
    pairs: Dict[str, Counter] = {}
    for im in images:
        for o in im.objects:
            pairs.setdefault(o, Counter()).update(x for x in im.objects if x != o)
    return {o: sorted(c, key=lambda x: (-c[x], x)) for o, c in pairs.items()}


def question_text(obj: str, template: str = POPE_TEMPLATE) -> str:
    """``template`` with ``obj``; "a {}" becomes "an {}" before a vowel (the official code means
    this, but its ``str.replace("a", "an")`` also turns "image" into "imange"; we do not)."""
    if obj[:1].lower() in "aeiou":
        template = template.replace(" a {}", " an {}")
    return template.format(obj)


def build_pope(
    images: Sequence[ImageObjects],
    split: str,
    *,
    num_per_image: int = 3,
    seed: int = 0,
    template: str = POPE_TEMPLATE,
) -> List[PopeQuestion]:
    """The questions of one split: for each image, up to ``num_per_image`` of its objects (its
    first ones) as "yes" questions, each followed by one "no" question about an object chosen by
    ``split``'s negative sampling. An image gets as many "yes" as it can get "no" questions
    (never more than the dataset has objects outside the image), so each split is balanced.
    Question ids count from 1 in order."""
    if split not in POPE_SPLITS:
        raise ConfigError(f"POPE split must be one of {POPE_SPLITS}, got {split!r}")
    if num_per_image < 1:
        raise ConfigError(f"num_per_image must be >= 1, got {num_per_image}")
    rng = np.random.default_rng([seed, POPE_SPLITS.index(split)])
    all_objects = sorted({o for im in images for o in im.objects})
    popular = frequency_order(images)
    together = co_occurrence_order(images)
    questions: List[PopeQuestion] = []

    def ask(im: ImageObjects, obj: str, label: str) -> None:
        questions.append(PopeQuestion(len(questions) + 1, split, im.image_id, im.file_name, obj,
                                      question_text(obj, template), label))

    for im in images:
        present = set(im.objects)
        asked: set = set()
        n = min(num_per_image, len(im.objects), len(all_objects) - len(present))
        for positive in im.objects[:n]:
            asked.add(positive)
            ask(im, positive, "yes")
            free = [o for o in all_objects if o not in present and o not in asked]
            order = {"random": [], "popular": popular, "adversarial": together.get(positive, [])}[split]
            negative = next((o for o in order if o not in present and o not in asked), None)
            if negative is None:  # random, or nothing left in the order: a random free object
                negative = free[int(rng.integers(len(free)))]
            asked.add(negative)
            ask(im, negative, "no")
    return questions


def build_pope_splits(
    images: Sequence[ImageObjects],
    splits: Sequence[str] = POPE_SPLITS,
    *,
    num_per_image: int = 3,
    seed: int = 0,
    num_images: Optional[int] = None,
    template: str = POPE_TEMPLATE,
) -> List[PopeQuestion]:
    """The questions of every split in ``splits``, on the same images: all of them, or
    ``num_images`` drawn with ``seed`` (kept in file order). Frequencies and co-occurrences are
    counted on the images used, as the official build does."""
    unknown = [s for s in splits if s not in POPE_SPLITS]
    if unknown or not splits:
        raise ConfigError(f"splits: each one of {POPE_SPLITS}, got {list(splits)}")
    if num_images is not None:
        if num_images < 1 or num_images > len(images):
            raise ConfigError(f"num_images: between 1 and the {len(images)} images with objects, got {num_images}")
        keep = np.sort(np.random.default_rng([seed, len(POPE_SPLITS)]).choice(len(images), num_images, replace=False))
        images = [images[int(i)] for i in keep]
    if not images:
        raise DataFormatError("POPE: no image has any object (check the annotations or the vocabulary)")
    questions = [q for s in splits for q in build_pope(images, s, num_per_image=num_per_image, seed=seed,
                                                          template=template)]
    if not questions:
        raise DataFormatError(f"POPE: no question can be asked: each of the {len(images)} images holds every "
                              "object of the dataset, so there is no object to ask about that is not in it")
    return questions
