"""Readers that turn dataset files into `Sample`s: LLaVA JSON / JSONL, COCO captions, VQAv2.

Every reader validates its input and raises `DataFormatError` naming the file, the record
(``path#index`` for JSON lists, ``path:line`` for JSONL) and the offending field. Image paths are
joined to `image_root` and must stay under it (`../` or an absolute path elsewhere is an error
unless the reader argument `allow_outside_root` is true); images are not opened here.
"""

from __future__ import annotations

import inspect
import json
import os
import string
from dataclasses import dataclass, replace
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from vlm.core.errors import ConfigError, DataFormatError
from vlm.core.registry import FunctionComponent, Registry, closest
from vlm.data.records import SPEAKERS as _SPEAKERS
from vlm.data.records import PathLike, read_utf8
from vlm.data.records import require as _require
from vlm.data.records import resolve_image as _resolve
from vlm.data.records import type_name as _type_name
from vlm.data.shards import (
    Shard,
    all_samples,
    parquet_shards,
    source_options,
    tar_shards,
)
from vlm.data.types import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    Sample,
    Turn,
    image_marker,
    marking_images_with,
)

CAPTION_PROMPT = "Describe the image briefly."
VQA_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
KARPATHY_SPLITS = ("train", "val", "test", "restval")

@dataclass(frozen=True)
class ReaderContext:
    """What a dataset is read for: the image marker of its texts (the model's ``image_token``)."""

    image_token: str = IMAGE_TOKEN


class Reader(FunctionComponent):
    """A reader function as a component. Its arguments are the dataset entry's ``args`` (keyword
    arguments, not an ``Options`` dataclass): ``check`` refuses a key that is not a parameter of
    the function, ``build(args, ctx)`` reads the samples with ``ctx``'s image marker."""

    def build(self, options: Optional[Mapping[str, Any]], ctx: ReaderContext) -> List[Sample]:
        with marking_images_with(ctx.image_token):
            return self.fn(**dict(options or {}))

    def check(self, cfg, where: str) -> None:
        """``cfg``: a dataset entry (``DataConfig``) at ``where``; each of its ``args`` must be
        an argument of the reader."""
        params = inspect.signature(self.fn).parameters
        for key in cfg.args:
            if key not in params:
                raise ConfigError(f"{where}.args.{key}: not an argument of {self.__name__}{closest(key, params)}")


# readers in modules of their own, imported on first use
READERS: Registry[Reader] = Registry("dataset format", {
    "preference_json": "vlm.data.preference:read_preference_json",
}, adapt=Reader.adapt)


def read_dataset(format: str, image_token: str = IMAGE_TOKEN, **kwargs: Any) -> List[Sample]:
    """Read a dataset with the reader registered under `format` (see `READERS.names()`);
    ``image_token`` is the image marker of its texts (the model's ``image_token``)."""
    return READERS.get(format).build(kwargs, ReaderContext(image_token))


# --------------------------------------------------------------------------------------------
# helpers


def _load_json(path: str) -> Any:
    try:
        return json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise DataFormatError(
            f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})"
        ) from None


def _require_list(data: Any, key: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data) if isinstance(data, dict) else _type_name(data)
        raise DataFormatError(f"{path}: expected an object with a list '{key}'; found {found}")
    return data[key]


def _check_roles(turns: List[Turn], where: str) -> None:
    """System turns only first; then user/assistant alternate, starting with user, ending
    with assistant."""
    start = 0
    while start < len(turns) and turns[start].role == "system":
        start += 1
    if start == len(turns):
        raise DataFormatError(f"{where}: field 'conversations' has no user or assistant turn")
    for i in range(start, len(turns)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if turns[i].role != expected:
            raise DataFormatError(
                f"{where}: field 'conversations[{i}].from': expected role '{expected}', got "
                f"'{turns[i].role}' (after leading system turns, user and assistant alternate, "
                "starting with user)"
            )
    if turns[-1].role != "assistant":
        raise DataFormatError(
            f"{where}: field 'conversations[{len(turns) - 1}]': the conversation ends with a "
            "user turn; training conversations must end with an assistant answer"
        )


def _llava_sample(
    record: Any, where: str, image_root: Optional[PathLike], default_id: str, allow_outside_root: bool = False
) -> Sample:
    """Build a Sample from one LLaVA record ({id, image?, conversations})."""
    conversations = _require(record, "conversations", list, where, "conversations")
    if not conversations:
        raise DataFormatError(f"{where}: field 'conversations' is empty")
    turns = []
    for i, turn in enumerate(conversations):
        speaker = _require(turn, "from", str, where, f"conversations[{i}].from")
        if speaker not in _SPEAKERS:
            raise DataFormatError(
                f"{where}: field 'conversations[{i}].from': unknown speaker '{speaker}'; "
                f"expected one of {', '.join(_SPEAKERS)}"
            )
        value = _require(turn, "value", str, where, f"conversations[{i}].value")
        turns.append(Turn(_SPEAKERS[speaker], value))
    _check_roles(turns, where)

    images = [_resolve(n, image_root, f"{where}: field 'image'", allow_outside_root)
              for n in _names(record, "image", where)]
    videos = [_resolve(n, image_root, f"{where}: field 'video'", allow_outside_root)
              for n in _names(record, "video", where)]
    marker = image_marker()
    if videos and not images and not _count(turns, VIDEO_TOKEN):
        # LLaVA-Video / OneVision records mark their video with the image marker
        turns = [Turn(t.role, t.content.replace(marker, VIDEO_TOKEN)) for t in turns]
    for token, visuals, key in ((marker, images, "image"), (VIDEO_TOKEN, videos, "video")):
        markers = _count(turns, token)
        if visuals and markers == 0:
            # LLaVA convention: a record without markers shows its image(s) / video(s) before
            # the first user message.
            first = next(i for i, t in enumerate(turns) if t.role == "user")
            turns[first] = Turn("user", f"{token}\n" * len(visuals) + turns[first].content)
        elif markers != len(visuals):
            raise DataFormatError(
                f"{where}: field 'conversations' has {markers} '{token}' marker(s) but field "
                f"'{key}' names {len(visuals)} {key}(s)"
            )
    sample_id = record.get("id", default_id)
    return Sample(id=str(sample_id), turns=turns, images=images, meta={"source": where}, videos=videos)


def _names(record: dict, key: str, where: str) -> List[str]:
    """A record's ``image`` / ``video`` field as a list of names (absent: none)."""
    value = record.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(n, str) for n in value):
        return value
    raise DataFormatError(f"{where}: field '{key}' must be a string or a list of strings, got {_type_name(value)}")


def _count(turns: Sequence[Turn], token: str) -> int:
    return sum(t.content.count(token) for t in turns)


# --------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL


@READERS.register("llava_json")
def read_llava_json(path: PathLike, image_root: Optional[PathLike] = None,
                    allow_outside_root: bool = False) -> List[Sample]:
    """Read a LLaVA conversation file: a JSON list of ``{id, image?, conversations}``.

    ``image`` is a path, a list of paths, or absent (text-only); ``video`` (LLaVA-Video /
    OneVision) likewise names video files or folders of frames, marked ``<video>`` in the text
    (a record with videos and no image may mark them ``<image>``, as LLaVA-Video's data does).
    Speakers human/gpt/system (or user/assistant) map to user/assistant/system. A record with
    image(s) but no ``<image>`` marker gets ``"<image>\\n"`` (one per image) prepended to its
    first user turn (and ``"<video>\\n"`` per unmarked video in front of those). Conversations
    must alternate user/assistant after optional leading system turns and end with assistant.
    """
    path = os.fspath(path)
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataFormatError(f"{path}: expected a JSON list of records, got {_type_name(records)}")
    name = os.path.basename(path)
    return [
        _llava_sample(rec, f"{path}#{i}", image_root, default_id=f"{name}#{i}",
                      allow_outside_root=allow_outside_root)
        for i, rec in enumerate(records)
    ]


@READERS.register("jsonl")
def read_jsonl(path: PathLike, image_root: Optional[PathLike] = None,
               allow_outside_root: bool = False) -> List[Sample]:
    """Read one record per line: a LLaVA record (as in `read_llava_json`) or ``{"text": ...}``.

    A ``{"text"}`` line is text-only language-modelling data: it becomes a Sample with a single
    assistant turn holding the text, no user turn and no images (``meta["text_only"] = True``).
    Blank lines are skipped; ``meta["source"]`` is ``"path:line"``.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    samples = []
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{where}: invalid JSON: {e.msg} (column {e.colno})"
            ) from None
        if isinstance(record, dict) and "conversations" not in record and "text" in record:
            text = _require(record, "text", str, where, "text")
            samples.append(
                Sample(
                    id=str(record.get("id", f"{name}:{lineno}")),
                    turns=[Turn("assistant", text)],
                    meta={"source": where, "text_only": True},
                )
            )
        elif isinstance(record, dict) and "conversations" not in record:
            raise DataFormatError(
                f"{where}: expected field 'conversations' (LLaVA record) or 'text' "
                f"(text-only record); found {sorted(record)}"
            )
        else:
            samples.append(_llava_sample(record, where, image_root, f"{name}:{lineno}", allow_outside_root))
    return samples


# --------------------------------------------------------------------------------------------
# COCO captions (official and Karpathy)


def _coco_images(data: dict, path: str) -> List[tuple]:
    """(image_id, file, [(caption_id, caption, source)], source) from an official COCO file."""
    images, by_id = [], {}
    for i, img in enumerate(data["images"]):
        where = f"{path}#{i}"
        image_id = _require(img, "id", (int, str), where, f"images[{i}].id")
        file_name = _require(img, "file_name", str, where, f"images[{i}].file_name")
        if image_id in by_id:
            raise DataFormatError(f"{where}: field 'images[{i}].id': duplicate image id {image_id}")
        by_id[image_id] = (image_id, file_name, [], where)
        images.append(by_id[image_id])
    for j, ann in enumerate(data["annotations"]):
        where = f"{path}#{j}"
        image_id = _require(ann, "image_id", (int, str), where, f"annotations[{j}].image_id")
        caption = _require(ann, "caption", str, where, f"annotations[{j}].caption")
        if image_id not in by_id:
            raise DataFormatError(
                f"{where}: field 'annotations[{j}].image_id': image id {image_id} is not in 'images'"
            )
        by_id[image_id][2].append((ann.get("id", j), caption.strip(), where))
    return images


def _karpathy_images(data: dict, path: str, split: Optional[Iterable[str]]) -> List[tuple]:
    """(image_id, file, [(caption_id, caption, source)], source) from a Karpathy split file."""
    images = []
    for i, img in enumerate(data["images"]):
        where = f"{path}#{i}"
        if split is not None:
            img_split = _require(img, "split", str, where, f"images[{i}].split")
            if img_split not in split:
                continue
        file_name = _require(img, "filename", str, where, f"images[{i}].filename")
        folder = img.get("filepath") or ""
        key = "cocoid" if "cocoid" in img else "imgid"
        image_id = _require(img, key, (int, str), where, f"images[{i}].{key} (or cocoid)")
        captions = []
        for k, sentence in enumerate(
            _require(img, "sentences", list, where, f"images[{i}].sentences")
        ):
            raw = _require(sentence, "raw", str, where, f"images[{i}].sentences[{k}].raw")
            captions.append((sentence.get("sentid", f"{image_id}_{k}"), raw.strip(), where))
        images.append((image_id, os.path.join(folder, file_name), captions, where))
    return images


@READERS.register("coco_captions")
def read_coco_captions(
    path: PathLike,
    image_root: Optional[PathLike] = None,
    *,
    prompt: str = CAPTION_PROMPT,
    per: str = "caption",
    split: Union[str, Iterable[str], None] = None,
    allow_outside_root: bool = False,
) -> List[Sample]:
    """Read captions from an official COCO ``captions_*.json`` or a Karpathy ``dataset_*.json``.

    The format is detected from the keys (official: ``images`` + ``annotations``; Karpathy:
    ``images`` whose records have ``sentences``). `split` (a name or several of train / val /
    test / restval) filters Karpathy images; it is an error for the official format.
    ``per="caption"``: one sample per caption, ``[user: "<image>\\n"+prompt, assistant: caption]``.
    ``per="image"``: one sample per image answered with its first caption, all captions in
    ``meta["references"]`` (an image without captions gives a user-only, inference sample).
    ``meta["image_id"]`` is the COCO id (Karpathy: ``cocoid``, else ``imgid``). Samples follow
    the order of the images.
    """
    path = os.fspath(path)
    if per not in ("caption", "image"):
        raise ConfigError(f"per must be 'caption' or 'image', got {per!r}")
    if isinstance(split, str):
        split = (split,)
    if split is not None:
        split = tuple(split)
        unknown = [s for s in split if s not in KARPATHY_SPLITS]
        if unknown:
            raise ConfigError(f"unknown Karpathy split(s) {unknown}; expected {KARPATHY_SPLITS}")

    data = _load_json(path)
    keys = sorted(data) if isinstance(data, dict) else _type_name(data)
    has_images = isinstance(data, dict) and isinstance(data.get("images"), list)
    if has_images and isinstance(data.get("annotations"), list):
        if split is not None:
            raise ConfigError(
                f"{path}: split={list(split)} was given but this is an official COCO captions "
                "file, which has no splits (read the captions file of the split you want)"
            )
        images = _coco_images(data, path)
    elif has_images and all(isinstance(i, dict) and "sentences" in i for i in data["images"]):
        images = _karpathy_images(data, path, split)
    else:
        raise DataFormatError(
            f"{path}: neither an official COCO captions file ('images' and 'annotations' lists) "
            f"nor a Karpathy split file ('images' with 'sentences'); found keys {keys}"
        )

    user = f"{image_marker()}\n{prompt}"
    samples = []
    for image_id, file_name, captions, where in images:
        image = _resolve(file_name, image_root, f"{where}: file name", allow_outside_root)
        if per == "image":
            turns = [Turn("user", user)] + [Turn("assistant", c) for _, c, _ in captions[:1]]
            meta = {
                "source": where,
                "image_id": image_id,
                "references": [c for _, c, _ in captions],
            }
            samples.append(Sample(id=str(image_id), turns=turns, images=[image], meta=meta))
            continue
        for caption_id, caption, source in captions:
            samples.append(
                Sample(
                    id=str(caption_id),
                    turns=[Turn("user", user), Turn("assistant", caption)],
                    images=[image],
                    meta={"source": source, "image_id": image_id, "caption_id": caption_id},
                )
            )
    return samples


# --------------------------------------------------------------------------------------------
# VQAv2


def _pattern_fields(pattern: str) -> set:
    return {
        name.split(".")[0].split("[")[0]
        for _, name, _, _ in string.Formatter().parse(pattern)
        if name is not None
    }


@READERS.register("vqav2")
def read_vqav2(
    questions_path: PathLike,
    annotations_path: Optional[PathLike] = None,
    image_root: Optional[PathLike] = None,
    *,
    image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg",
    prompt_suffix: str = VQA_PROMPT_SUFFIX,
    answer_types: Optional[Sequence[str]] = None,
    allow_outside_root: bool = False,
    only_answers: Optional[Sequence[str]] = None,
) -> List[Sample]:
    """Read VQAv2 questions (and optionally their annotations): one sample per question.

    The image file is ``image_pattern`` formatted with ``subset`` (the questions file's
    ``data_subtype``), ``image_id`` and ``question_id``, joined to `image_root`. The user turn is
    ``"<image>\\n" + question + prompt_suffix``. With annotations, the assistant turn is the
    ``multiple_choice_answer`` and ``meta`` holds ``answers`` (the 10 annotator strings),
    ``answer_type`` and ``question_type``; without them the sample has only the user turn (an
    inference-only sample) and no answer fields. ``meta`` always has ``question_id``,
    ``image_id`` and ``question``. Every question must have exactly one annotation and vice versa.
    A question record may name its own ``image`` and / or ``video`` (a path or a list, under
    ``image_root``) instead: several images or a clip, marked in that order before the question
    (a question whose text places its own ``<image>`` / ``<video>`` markers keeps them as they stand).
    ``answer_types`` (needs annotations) keeps only the questions of those answer types
    (VQAv2's ``yes/no``, ``number``, ``other``), e.g. to up-weight one type in a training mix;
    ``only_answers`` (needs annotations) keeps only those whose ``multiple_choice_answer`` is one of
    them, e.g. a skewed training mix (only the "yes" questions).
    """
    for name, value, by in (("answer_types", answer_types, "answer type"), ("only_answers", only_answers, "answer")):
        if value is not None and annotations_path is None:
            raise ConfigError(f"{name}: filtering by {by} needs annotations_path")
        if isinstance(value, str):
            raise ConfigError(f"{name}: a list, got the string {value!r}")
    if answer_types is not None:
        if annotations_path is None:
            raise ConfigError("answer_types: filtering by answer type needs annotations_path")
        if isinstance(answer_types, str):
            raise ConfigError(f"answer_types: a list of answer types, got the string {answer_types!r}")
    qpath = os.fspath(questions_path)
    qdata = _load_json(qpath)
    questions = _require_list(qdata, "questions", qpath)
    subset = qdata.get("data_subtype")
    fields = _pattern_fields(image_pattern)
    unknown = fields - {"subset", "image_id", "question_id"}
    if unknown:
        raise ConfigError(
            f"image_pattern {image_pattern!r} uses unknown field(s) {sorted(unknown)}; "
            "available: subset, image_id, question_id"
        )
    if "subset" in fields and not isinstance(subset, str):
        raise DataFormatError(
            f"{qpath}: image_pattern {image_pattern!r} needs {{subset}} but the file has no "
            "'data_subtype' string"
        )

    parsed, index = [], {}
    own: Dict[Any, tuple] = {}  # question_id -> its own (images, videos)
    for i, q in enumerate(questions):
        where = f"{qpath}#{i}"
        qid = _require(q, "question_id", (int, str), where, f"questions[{i}].question_id")
        image_id = _require(q, "image_id", (int, str), where, f"questions[{i}].image_id")
        text = _require(q, "question", str, where, f"questions[{i}].question")
        if qid in index:
            raise DataFormatError(
                f"{where}: field 'questions[{i}].question_id': duplicate question_id {qid}"
            )
        index[qid] = i
        parsed.append((qid, image_id, text, where))
        if "image" in q or "video" in q:  # a question about several images or a video names them itself
            own[qid] = (_names(q, "image", where), _names(q, "video", where))

    annotations: Optional[Dict[Any, dict]] = None
    if annotations_path is not None:
        apath = os.fspath(annotations_path)
        annotations = {}
        for j, ann in enumerate(_require_list(_load_json(apath), "annotations", apath)):
            where = f"{apath}#{j}"
            qid = _require(ann, "question_id", (int, str), where, f"annotations[{j}].question_id")
            if qid not in index:
                raise DataFormatError(
                    f"{where}: question_id {qid} of {apath} is not among the questions of {qpath}"
                )
            if qid in annotations:
                raise DataFormatError(f"{where}: duplicate annotation for question_id {qid}")
            image_id = _require(ann, "image_id", (int, str), where, f"annotations[{j}].image_id")
            if image_id != parsed[index[qid]][1]:
                raise DataFormatError(
                    f"{where}: field 'annotations[{j}].image_id' is {image_id} but question_id "
                    f"{qid} in {qpath} refers to image {parsed[index[qid]][1]}"
                )
            answers = []
            for k, a in enumerate(
                _require(ann, "answers", list, where, f"annotations[{j}].answers")
            ):
                answers.append(
                    _require(a, "answer", str, where, f"annotations[{j}].answers[{k}].answer")
                )
            annotations[qid] = {
                "answer": _require(
                    ann,
                    "multiple_choice_answer",
                    str,
                    where,
                    f"annotations[{j}].multiple_choice_answer",
                ),
                "answers": answers,
                "answer_type": _require(
                    ann, "answer_type", str, where, f"annotations[{j}].answer_type"
                ),
                "question_type": ann.get("question_type"),
            }
        missing = [qid for qid, _, _, _ in parsed if qid not in annotations]
        if missing:
            raise DataFormatError(
                f"{qpath}#{index[missing[0]]}: question_id {missing[0]} of {qpath} has no "
                f"annotation in {apath} ({len(missing)} question(s) unannotated)"
            )

    if answer_types is not None:
        wanted = set(answer_types)
        parsed = [p for p in parsed if annotations[p[0]]["answer_type"] in wanted]
        if not parsed:
            raise DataFormatError(f"{annotations_path}: no question has answer_type in {sorted(wanted)}")
    if only_answers is not None:
        wanted = set(only_answers)
        parsed = [p for p in parsed if annotations[p[0]]["answer"] in wanted]
        if not parsed:
            raise DataFormatError(f"{annotations_path}: no question has multiple_choice_answer in {sorted(wanted)}")
    samples = []
    for qid, image_id, text, where in parsed:
        images, videos = own.get(qid) or ([image_pattern.format(subset=subset, image_id=image_id, question_id=qid)], [])
        # a question that places its own markers (interleaved with text) keeps them as they stand
        placed = image_marker() in text or VIDEO_TOKEN in text
        markers = "" if placed else f"{image_marker()}\n" * len(images) + f"{VIDEO_TOKEN}\n" * len(videos)
        turns = [Turn("user", f"{markers}{text}{prompt_suffix}")]
        meta: Dict[str, Any] = {
            "source": where,
            "question_id": qid,
            "image_id": image_id,
            "question": text,
        }
        if annotations is not None:
            ann = annotations[qid]
            turns.append(Turn("assistant", ann["answer"]))
            meta.update(
                answers=ann["answers"],
                answer_type=ann["answer_type"],
                question_type=ann["question_type"],
            )
        samples.append(
            Sample(id=str(qid), turns=turns, images=[_resolve(n, image_root, f"{where}: image", allow_outside_root)
                                                     for n in images],
                   videos=[_resolve(n, image_root, f"{where}: video", allow_outside_root) for n in videos], meta=meta)
        )
    return samples


def read_samples(data_cfgs, image_token: str = IMAGE_TOKEN) -> List[Sample]:
    """Read and concatenate every dataset of a stage (``max_samples``, then ``repeat``, applied
    per dataset; a dataset's ``max_visual_tokens`` goes on each of its samples); ``image_token``
    marks the images in their texts (the model's)."""
    samples: List[Sample] = []
    for data in data_cfgs:
        part = read_dataset(data.format, image_token=image_token, **dict(data.args))
        part = part[: data.max_samples] if data.max_samples else part
        if data.max_visual_tokens is not None:
            part = [replace(sample, max_visual_tokens=data.max_visual_tokens) for sample in part]
        samples.extend(part * data.repeat)
    return samples


# --------------------------------------------------------------------------------------------
# POPE


@READERS.register("pope")
def read_pope(
    annotations: PathLike,
    image_root: Optional[PathLike] = None,
    *,
    source: str = "instances",
    vocabulary: Optional[Sequence[str]] = None,
    splits: Sequence[str] = ("random", "popular", "adversarial"),
    num_per_image: int = 3,
    num_images: Optional[int] = None,
    seed: int = 0,
    prompt_suffix: str = VQA_PROMPT_SUFFIX,
    allow_outside_root: bool = False,
) -> List[Sample]:
    """POPE questions (``vlm.data.pope``) built from ``annotations``: a COCO instances file
    (``source: instances``) or a COCO captions file whose captions mention words of
    ``vocabulary`` (``source: captions``). One sample per question and split,
    ``[user: "<image>\\n" + "Is there a {object} in the image?" + prompt_suffix, assistant: yes|no]``;
    ``meta`` holds ``question_id`` (counted per split), ``split``, ``image_id``, ``object``,
    ``label`` and ``question``; sample ids are ``{split}/{question_id}``. Samples come image by
    image (each image's questions of every split together), so that the first N samples
    (``max_samples``) cover every split."""
    from vlm.data import pope

    path = os.fspath(annotations)
    if source == "instances":
        if vocabulary is not None:
            raise ConfigError("vocabulary: only with source: captions (instances name their categories)")
        images = pope.objects_from_instances(path)
    elif source == "captions":
        images = pope.objects_from_captions(path, vocabulary)
    else:
        raise ConfigError(f"source must be one of {pope.SOURCES}, got {source!r}")
    if isinstance(splits, str):
        splits = (splits,)
    questions = pope.build_pope_splits(images, tuple(splits), num_per_image=num_per_image, seed=seed,
                                       num_images=num_images)
    order = {image_id: i for i, image_id in enumerate(dict.fromkeys(q.image_id for q in questions))}
    questions.sort(key=lambda q: order[q.image_id])  # image by image: the first N cover every split
    marker = image_marker()
    return [
        Sample(id=f"{q.split}/{q.question_id}",
               turns=[Turn("user", f"{marker}\n{q.text}{prompt_suffix}"), Turn("assistant", q.label)],
               images=[_resolve(q.file_name, image_root, f"{path}: image {q.image_id}", allow_outside_root)],
               meta={"source": f"{path}#image {q.image_id}", "question_id": q.question_id, "split": q.split,
                     "image_id": q.image_id, "object": q.object, "label": q.label, "question": q.text})
        for q in questions
    ]


# --------------------------------------------------------------------------------------------
# sharded sources (vlm.data.shards): webdataset tars, HF datasets


def webdataset_shards(shards: Union[str, Sequence[str]], prompt: str = CAPTION_PROMPT,
                      vqa_prompt_suffix: str = VQA_PROMPT_SUFFIX, image_token: Optional[str] = None) -> List[Shard]:
    """The tar shards of a ``format: webdataset`` entry with their sample counts (no record read);
    ``image_token`` marks images in the texts (default: the current marker)."""
    return tar_shards(shards, source_options(prompt, vqa_prompt_suffix, _llava_sample, image_token))


def hf_shards(path: PathLike, prompt: str = CAPTION_PROMPT, vqa_prompt_suffix: str = VQA_PROMPT_SUFFIX,
              image_token: Optional[str] = None) -> List[Shard]:
    """The data files of a ``format: hf_dataset`` entry as shards with their row counts."""
    return parquet_shards(os.fspath(path), source_options(prompt, vqa_prompt_suffix, _llava_sample, image_token))


@READERS.register("webdataset")
def read_webdataset(shards: Union[str, Sequence[str]], prompt: str = CAPTION_PROMPT,
                    vqa_prompt_suffix: str = VQA_PROMPT_SUFFIX, streaming: bool = True) -> List[Sample]:
    """Read webdataset tar shards (``shards``: a path, a brace pattern such as
    ``DIR/{000000..000009}.tar``, a glob, or a list of them). Each key is a sample: images from
    its jpg / jpeg / png / webp members, metadata from ``key.json`` (LLaVA ``conversations``,
    ``question`` + ``answer``, or ``caption``) or ``key.txt`` (a caption, asked with ``prompt``).
    Records that cannot be trained on are skipped with a warning naming the shard and key. With
    ``streaming`` (the default) a training stage streams the shards (vlm.data.streaming) instead
    of holding every sample in memory; this list is what conversion and inspection read."""
    return all_samples(webdataset_shards(shards, prompt, vqa_prompt_suffix))


@READERS.register("hf_dataset")
def read_hf_dataset(path: str, prompt: str = CAPTION_PROMPT, vqa_prompt_suffix: str = VQA_PROMPT_SUFFIX,
                    streaming: bool = False) -> List[Sample]:
    """Read an HF dataset stored locally: a ``save_to_disk`` folder, a folder of parquet / arrow /
    JSON-lines files, one file, or a glob, each file read a row group at a time. Rows become samples by their columns (``conversations``; ``question`` +
    ``answer``; ``caption`` / ``text``), with images from ``image`` / ``images``. With
    ``streaming: true`` a training stage streams the files (vlm.data.streaming) instead of holding
    every sample in memory; this list is what conversion and inspection read."""
    return all_samples(hf_shards(path, prompt, vqa_prompt_suffix))


SHARDED = {"webdataset": webdataset_shards, "hf_dataset": hf_shards}  # format -> its shards


def source_shards(format: str, args: Mapping[str, Any], image_token: Optional[str] = None) -> Optional[List[Shard]]:
    """The shards of a dataset entry that streams (a sharded format whose ``streaming`` argument,
    explicit or default, is true), else None; ``image_token`` marks images in its texts."""
    if format not in SHARDED:
        return None
    default = inspect.signature(READERS.get(format).fn).parameters["streaming"].default
    if not args.get("streaming", default):
        return None
    return SHARDED[format](**{k: v for k, v in args.items() if k != "streaming"}, image_token=image_token)
