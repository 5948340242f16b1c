"""Preference pairs (``preference_json``): a prompt, its images, a chosen and a rejected answer.

One record is a conversation up to the answer (its last turn a user turn), the images it refers to,
and two answers: ``chosen`` (preferred) and ``rejected``. The reader returns :class:`Sample`s whose
``turns`` are the prompt and whose ``meta`` holds ``chosen`` and ``rejected`` (plus ``scores``
when the record has them); :class:`vlm.data.pairs.PairDataset` turns them into pairs of rows.

``layout`` names the record layout explicitly (never guessed from the keys):

- ``native``: ``{id?, image?, conversations, chosen, rejected, scores?}`` (LLaVA turns ending with
  a user turn; ``image`` a path or a list of paths);
- ``rlaif_v`` (openbmb/RLAIF-V-Dataset): ``{idx?, image | image_path, question, chosen, rejected}``;
- ``llava_next`` (LLaVA-NeXT's DPO json): ``{id?, image?, prompt, chosen, rejected}``;
- ``vlfeedback`` (MMInstruction/VLFeedback): ``{id?, img_path, prompt, completions: [{response,
  annotations: {aspect: {Rating}}}]}``: the best-rated completion (mean over the aspects) is
  chosen, the worst rejected; records whose completions all rate the same are skipped, counted.

Records come from a JSON list (``path``, named ``path:line``), JSON Lines (``path`` ending
``.jsonl``, ``path:line``) or a local HF dataset (``hf_dataset``: a ``datasets.save_to_disk``
folder or a ``.parquet`` file, named ``path#row``). Images embedded in an HF dataset (an
``Image`` column) are written once to ``extract_images_to``. Every error is a DataFormatError
naming the record: a missing field, an empty answer, chosen equal to rejected.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.records import (
    SPEAKERS,
    PathLike,
    read_utf8,
    require,
    resolve_image,
    type_name,
)
from vlm.data.types import Sample, Turn, image_marker

logger = logging.getLogger(__name__)

LAYOUTS = ("native", "rlaif_v", "llava_next", "vlfeedback")


def _records_json(path: str) -> Iterator[Tuple[str, Any]]:
    """``(path:line, record)`` for every element of a JSON list (the line its record starts on)."""
    text = read_utf8(path)
    decoder = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def bad(i: int, msg: str) -> DataFormatError:
        return DataFormatError(f"{path}:{text.count(chr(10), 0, i) + 1}: invalid JSON: {msg}")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise bad(i, "expected a JSON list of records")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield f"{path}:{text.count(chr(10), 0, i) + 1}", record
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise bad(i, "expected ',' or ']' after a record")


def _records_jsonl(path: str) -> Iterator[Tuple[str, Any]]:
    for lineno, line in enumerate(read_utf8(path).split("\n"), start=1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _records_hf(path: str) -> Iterator[Tuple[str, Any]]:
    import datasets

    if path.endswith(".parquet"):
        table = datasets.Dataset.from_parquet(path)
    elif os.path.isdir(path):
        table = datasets.load_from_disk(path)
        if isinstance(table, datasets.DatasetDict):
            raise DataFormatError(f"{path}: a DatasetDict ({', '.join(table)}); name one split's folder")
    else:
        raise DataFormatError(f"{path}: not a datasets.save_to_disk folder nor a .parquet file")
    for row, record in enumerate(table):
        yield f"{path}#{row}", record


def _answer(record: Any, key: str, where: str) -> str:
    value = require(record, key, str, where, key)
    if not value.strip():
        raise DataFormatError(f"{where}: field '{key}' is empty")
    return value


def _image_names(value: Any, where: str, key: str) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, dict)) or hasattr(value, "save"):
        return [value]
    if isinstance(value, list):
        return value
    raise DataFormatError(f"{where}: field '{key}' must be a path or a list of paths, got {type_name(value)}")


class _Images:
    """Image paths of records: joined to ``image_root`` (kept under it), and images embedded in
    an HF dataset written once to ``extract_to``."""

    def __init__(self, image_root: Optional[PathLike], extract_to: Optional[PathLike], allow_outside_root: bool):
        self.image_root, self.extract_to, self.allow = image_root, extract_to, allow_outside_root

    def __call__(self, value: Any, where: str, key: str, record_id: str) -> List[str]:
        paths = []
        for k, image in enumerate(_image_names(value, where, key)):
            if isinstance(image, dict) and image.get("bytes") is None and isinstance(image.get("path"), str):
                image = image["path"]
            if isinstance(image, str):
                paths.append(resolve_image(image, self.image_root, f"{where}: field '{key}'", self.allow))
                continue
            if self.extract_to is None:
                raise DataFormatError(f"{where}: field '{key}' holds an embedded image; set the reader "
                                      "argument extract_images_to: a folder to write it to")
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in record_id)
            out = os.path.join(os.fspath(self.extract_to), f"{safe}_{k}.png")
            if not os.path.exists(out):
                os.makedirs(os.path.dirname(out), exist_ok=True)
                from PIL import Image

                picture = Image.open(io.BytesIO(image["bytes"])) if isinstance(image, dict) else image
                tmp = out + ".tmp"
                picture.convert("RGB").save(tmp, format="PNG")
                os.replace(tmp, out)
            paths.append(out)
        return paths


def _with_markers(turns: List[Turn], images: List[str], where: str, key: str) -> List[Turn]:
    """Markers as LLaVA does: none in the text -> one per image before the first user turn."""
    marker = image_marker()
    markers = sum(t.content.count(marker) for t in turns)
    if images and markers == 0:
        first = next(i for i, t in enumerate(turns) if t.role == "user")
        turns[first] = Turn("user", f"{marker}\n" * len(images) + turns[first].content)
    elif markers != len(images):
        raise DataFormatError(f"{where}: field '{key}' has {markers} '{marker}' marker(s) but "
                              f"{len(images)} image(s)")
    return turns


def _prompt_turns(conversations: Any, where: str) -> List[Turn]:
    """LLaVA turns that end with a user turn (the conversation up to the answer)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataFormatError(f"{where}: field 'conversations' must be a non-empty list")
    turns = []
    for i, turn in enumerate(conversations):
        speaker = require(turn, "from", str, where, f"conversations[{i}].from")
        if speaker not in SPEAKERS:
            raise DataFormatError(f"{where}: field 'conversations[{i}].from': unknown speaker '{speaker}'")
        turns.append(Turn(SPEAKERS[speaker], require(turn, "value", str, where, f"conversations[{i}].value")))
    if turns[-1].role != "user":
        raise DataFormatError(f"{where}: field 'conversations': the prompt must end with a user turn "
                              "(the answers are 'chosen' and 'rejected')")
    return turns


def _mean_rating(completion: Any, where: str, i: int) -> float:
    annotations = require(completion, "annotations", dict, where, f"completions[{i}].annotations")
    ratings = []
    for aspect, note in annotations.items():
        rating = note.get("Rating") if isinstance(note, dict) else None
        try:
            ratings.append(float(rating))
        except (TypeError, ValueError):
            raise DataFormatError(f"{where}: field 'completions[{i}].annotations.{aspect}.Rating' is not a "
                                  f"number: {rating!r}") from None
    if not ratings:
        raise DataFormatError(f"{where}: field 'completions[{i}].annotations' is empty")
    return sum(ratings) / len(ratings)


# one function per layout: (record, where, images) -> (id, turns, images, chosen, rejected, scores) or None
def _native(record, where, images):
    turns = _prompt_turns(require(record, "conversations", list, where, "conversations"), where)
    paths = images(record.get("image"), where, "image", str(record.get("id", where)))
    return (record.get("id"), _with_markers(turns, paths, where, "conversations"), paths,
            _answer(record, "chosen", where), _answer(record, "rejected", where), record.get("scores"))


def _rlaif_v(record, where, images):
    question = require(record, "question", str, where, "question")
    key = "image" if record.get("image") is not None else "image_path"
    if record.get(key) is None:
        raise DataFormatError(f"{where}: missing field 'image' (or 'image_path')")
    record_id = str(record.get("idx", where))
    paths = images(record[key], where, key, record_id)
    return (record.get("idx"), _with_markers([Turn("user", question)], paths, where, "question"), paths,
            _answer(record, "chosen", where), _answer(record, "rejected", where), None)


def _llava_next(record, where, images):
    prompt = require(record, "prompt", str, where, "prompt")
    paths = images(record.get("image"), where, "image", str(record.get("id", where)))
    return (record.get("id"), _with_markers([Turn("user", prompt)], paths, where, "prompt"), paths,
            _answer(record, "chosen", where), _answer(record, "rejected", where), None)


def _vlfeedback(record, where, images):
    prompt = require(record, "prompt", str, where, "prompt")
    completions = require(record, "completions", list, where, "completions")
    rated = []
    for i, completion in enumerate(completions):
        response = require(completion, "response", str, where, f"completions[{i}].response")
        rated.append((_mean_rating(completion, where, i), response))
    if len(rated) < 2:
        raise DataFormatError(f"{where}: field 'completions' needs at least two completions")
    best, worst = max(rated, key=lambda r: r[0]), min(rated, key=lambda r: r[0])
    if best[0] == worst[0]:
        return None
    paths = images(require(record, "img_path", str, where, "img_path"), where, "img_path",
                   str(record.get("id", where)))
    pair = {"chosen": best[1], "rejected": worst[1]}
    return (record.get("id"), _with_markers([Turn("user", prompt)], paths, where, "prompt"), paths,
            _answer(pair, "chosen", where), _answer(pair, "rejected", where),
            {"chosen": best[0], "rejected": worst[0]})


_LAYOUTS: Dict[str, Callable] = {"native": _native, "rlaif_v": _rlaif_v, "llava_next": _llava_next,
                                 "vlfeedback": _vlfeedback}


def read_preference_json(path: Optional[PathLike] = None, image_root: Optional[PathLike] = None,
                         layout: str = "native", hf_dataset: Optional[PathLike] = None,
                         extract_images_to: Optional[PathLike] = None,
                         allow_outside_root: bool = False) -> List[Sample]:
    """Read preference pairs (one of ``path`` or ``hf_dataset``) in ``layout`` (see the module):
    one Sample per pair, the prompt as its turns, ``meta`` ``chosen``, ``rejected``, ``source``
    and, when the record has them, ``scores``."""
    if layout not in _LAYOUTS:
        raise ConfigError(f"layout: unknown preference layout '{layout}'; known: {', '.join(LAYOUTS)}")
    if (path is None) == (hf_dataset is None):
        raise ConfigError("preference_json: give exactly one of path (JSON / JSONL) and hf_dataset")
    if path is not None:
        path = os.fspath(path)
        records = _records_jsonl(path) if path.endswith(".jsonl") else _records_json(path)
    else:
        records = _records_hf(os.fspath(hf_dataset))
    images = _Images(image_root, extract_images_to, allow_outside_root)
    read, samples, ties = _LAYOUTS[layout], [], 0
    for where, record in records:
        if not isinstance(record, dict):
            raise DataFormatError(f"{where}: expected an object, got {type_name(record)}")
        pair = read(record, where, images)
        if pair is None:
            ties += 1
            continue
        record_id, turns, paths, chosen, rejected, scores = pair
        if chosen.strip() == rejected.strip():
            raise DataFormatError(f"{where}: fields 'chosen' and 'rejected' are the same answer")
        meta: Dict[str, Any] = {"source": where, "chosen": chosen, "rejected": rejected}
        if scores is not None:
            meta["scores"] = scores
        samples.append(Sample(id=str(record_id if record_id is not None else where), turns=turns,
                              images=paths, meta=meta))
    if ties:
        logger.warning("%s: %d record(s) skipped: every completion rated the same", path or hf_dataset, ties)
    return samples
