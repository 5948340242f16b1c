"""What every dataset reader shares: UTF-8 text, required fields, image paths kept under a root."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from vlm.core.errors import DataFormatError

PathLike = Union[str, "os.PathLike[str]"]

# LLaVA's speaker names -> our roles
SPEAKERS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def read_utf8(path: PathLike) -> str:
    """The text of a UTF-8 file; a DataFormatError naming the file, line and byte offset when
    it is not UTF-8 (a leading BOM is accepted)."""
    data = open(path, "rb").read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(
            f"{os.fspath(path)}:{line}: not UTF-8 at byte {e.start} ({data[e.start:e.start + 1]!r}); "
            "re-save the file as UTF-8"
        ) from None


def resolve_image(image: str, image_root: Optional[PathLike], where: str = "", allow_outside_root: bool = False) -> str:
    """``image`` joined to ``image_root`` (an absolute path is kept); a DataFormatError naming
    ``where`` when the result is outside ``image_root`` (``../``, an absolute path elsewhere)
    unless ``allow_outside_root``."""
    if image_root is None:
        return image
    root = os.fspath(image_root)
    path = image if os.path.isabs(image) else os.path.join(root, image)
    if not allow_outside_root:
        real_root, real = os.path.abspath(root), os.path.abspath(path)  # string ops: fast on big sets
        if os.path.commonpath([real_root, real]) != real_root:
            raise DataFormatError(f"{where}: image '{image}' is outside image_root {root}; move it under "
                                  "image_root, or set the reader argument allow_outside_root: true")
    return path


def type_name(value: Any) -> str:
    """``null`` or the name of ``value``'s type, for error messages."""
    return "null" if value is None else type(value).__name__


def require(record: Any, key: str, types: Any, where: str, field: str) -> Any:
    """Return record[key], raising a DataFormatError naming `where` and `field` if bad."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object, got {type_name(record)}")
    if key not in record:
        raise DataFormatError(f"{where}: missing field '{field}'")
    value = record[key]
    # bool is an int subclass, but never a valid id or text
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataFormatError(
            f"{where}: field '{field}' has type {type_name(value)}, expected "
            + " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        )
    return value
