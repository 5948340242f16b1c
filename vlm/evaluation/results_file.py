"""The JSON files the metrics read (questions, annotations, results), checked record by record.

The JSON files the metrics read (questions, annotations, results): a path or an already
loaded object, checked record by record, every error naming the file and the record.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from vlm.core.errors import DataFormatError


def load_json(source: Any, what: str) -> tuple[Any, str]:
    """Return (object, label): ``source`` is a path to a JSON file or an already-loaded object."""
    if isinstance(source, (str, os.PathLike)):
        label = f"{what} file {os.fspath(source)!r}"
        try:
            from vlm.data.formats import read_utf8

            return json.loads(read_utf8(source)), label
        except FileNotFoundError:
            raise FileNotFoundError(f"{what} file not found: {os.fspath(source)!r}") from None
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{label} is not valid JSON: {e}") from None
    return source, f"{what} (in-memory object)"


def record_list(obj: Any, key: str, label: str) -> list:
    """``obj[key]``; DataFormatError unless ``obj`` is a JSON object whose ``key`` is a list."""
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        raise DataFormatError(f"{label} must be a JSON object whose {key!r} is a list")
    return obj[key]


def require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    """DataFormatError unless ``entry`` is a JSON object holding every one of ``keys``."""
    if not isinstance(entry, dict):
        raise DataFormatError(f"{where} is not a JSON object: {entry!r}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataFormatError(f"{where} is missing key(s) {missing}: {entry!r}")


def results_by_id(results: Any, label: str, id_key: str, text_key: str, known: Callable[[int, Any], bool],
                  nonempty: Optional[str] = None) -> dict:
    """``{id: text}`` of a results list ``[{id_key: id, text_key: text}, ...]`` (``label`` names
    it in errors). DataFormatError when ``results`` is not a list, or an empty one where
    ``nonempty`` names what it should hold; for a record without both keys, an id given twice,
    a text that is not a string. ``known(i, id)`` checks the id of record ``i`` first: it raises
    for an id the other files do not have, or returns False to leave the record out."""
    if not isinstance(results, list):
        raise DataFormatError(f"{label} must be a JSON list of {{'{id_key}', '{text_key}'}} objects, "
                              f"got {type(results).__name__}")
    if nonempty is not None and not results:
        raise DataFormatError(f"{label} is empty: no {nonempty} to score")
    by_id = {}
    for i, res in enumerate(results):
        require(res, (id_key, text_key), f"result #{i} in {label}")
        key = res[id_key]
        if not known(i, key):
            continue
        if key in by_id:
            raise DataFormatError(f"{id_key} {key!r} appears more than once in {label}")
        if not isinstance(res[text_key], str):
            raise DataFormatError(f"result for {id_key} {key!r} in {label} has a non-string "
                                  f"{text_key}: {res[text_key]!r}")
        by_id[key] = res[text_key]
    return by_id
