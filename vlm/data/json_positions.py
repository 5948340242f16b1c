"""Where a JSON file's records start: the line of a list item, for error messages."""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import os
from typing import Dict, List, Optional

# above this size a file is not parsed a second time just to name a line
MAX_BYTES = 64 * 1024 * 1024


def item_line(path: str | os.PathLike, key: str, index: int) -> Optional[int]:
    """The line (from 1) where item ``index`` of the top-level list ``key`` starts in the JSON
    file ``path``; None when there is no such item, the file does not parse or is over
    :data:`MAX_BYTES`. Parses the file again, slowly: call it only to write an error."""
    try:
        if os.path.getsize(path) > MAX_BYTES:
            return None
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    item_starts: Dict[int, List[int]] = {}  # id(list) -> where each of its items starts

    def parse_array(s_and_end, scan_once):
        starts: List[int] = []

        def scan_item(string, idx):  # the array parser calls it at each item's first character
            starts.append(idx)
            return scan_once(string, idx)

        array, end = json.decoder.JSONArray(s_and_end, scan_item)
        item_starts[id(array)] = starts
        return array, end

    decoder = json.JSONDecoder()
    decoder.parse_array = parse_array
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner has no hook for it
    try:
        items = decoder.decode(text)[key]
        start = item_starts[id(items)][index]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return text.count("\n", 0, start) + 1
