"""OpenAI chat completion requests -> vlm conversations, with OpenAI-style errors.

A message's content is a string or a list of parts: ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": ...}}`` (or ``"image_url": "..."``), and
``{"type": "video_url", "video_url": {"url": ...}}`` for a video (as vLLM takes them). An image
part becomes ``<image>\\n`` where it stands, a video part ``<video>\\n``; the processor then
places them as the model was trained (``model.image_placement``). URLs are ``data:`` URIs; local
paths (``file://`` or plain) only under ``image_root``; remote URLs are not fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from PIL import Image

from vlm.core.errors import ImageLoadError
from vlm.data.types import IMAGE_TOKEN, VIDEO_TOKEN, Sample, Turn

MAX_TOKENS_LIMIT = 4096
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body (and ``headers``)."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 status: int = 400, kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    sample: Sample
    max_tokens: int
    temperature: float
    top_p: float
    stop: List[str]
    stream: bool
    model: Optional[str]
    max_tokens_given: bool = True  # False: the default, lowered to what the context leaves


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", param=name,
                       code="invalid_value")
    return value


def _source(url: str, image_root: Optional[Path], param: str, noun: str = "image") -> Any:
    """What a part's URL names: the bytes of a ``data:`` URI, or a path under ``image_root``."""
    code = f"invalid_{noun}"
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64") or not data:
            raise APIError(f"{noun} data URIs must be base64: data:{noun}/<type>;base64,<data>", param=param,
                           code=code)
        try:
            return io.BytesIO(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise APIError(f"{noun} data URI: invalid base64", param=param, code=code) from None
    if url.startswith(("http://", "https://")):
        raise APIError(f"remote {noun} URLs are not fetched; send a data: URI (or a path under --image-root)",
                       param=param, code=code)
    if image_root is None:
        raise APIError(f"local {noun} paths are refused: the server has no --image-root", param=param, code=code)
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    path = (image_root / path if not path.is_absolute() else path).resolve()
    if not path.is_relative_to(image_root):
        raise APIError(f"{noun} path {url} is outside --image-root", param=param, code=code)
    # a video may be a folder of frames
    if not (path.is_file() or (noun == "video" and path.is_dir())):
        raise APIError(f"{noun} path {url}: no such file under --image-root", param=param, code=code)
    return path


def decode_video(url: str, image_root: Optional[Path], param: str) -> Any:
    """The video a part's URL names: its bytes in memory (a data URI) or its path (a file or a
    folder of frames under ``image_root``); decoded, with its frames sampled, by the processor."""
    source = _source(url, image_root, param, "video")
    return os.fspath(source) if isinstance(source, Path) else source


def decode_image(url: str, image_root: Optional[Path], param: str) -> Image.Image:
    """The image a part's URL names, loaded in memory."""
    source = _source(url, image_root, param)
    try:
        with Image.open(source) as image:
            image.load()
            return image.copy()
    except Exception as exc:  # PIL raises many kinds for bad data
        raise APIError(f"cannot read the image: {exc}", param=param, code="invalid_image") from None


def _check_text(text: str, param: str) -> None:
    for marker, part in ((IMAGE_TOKEN, "image_url"), (VIDEO_TOKEN, "video_url")):
        if marker in text:
            raise APIError(f"'{marker}' in text: send {part.split('_')[0]}s as {part} parts", param=param)


def _content(content, index: int, image_root: Optional[Path], images: List[Image.Image],
             videos: Optional[List[Any]] = None) -> str:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        _check_text(content, where)
        return content
    if not isinstance(content, list) or not content:
        raise APIError("content must be a string or a non-empty list of parts", param=where)
    text = ""
    for j, part in enumerate(content):
        param = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            _check_text(part["text"], param)
            text += part["text"]
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError("image_url part needs image_url.url", param=param)
            images.append(decode_image(url, image_root, f"{param}.image_url"))
            text += IMAGE_TOKEN + "\n"
        elif kind == "video_url" and videos is not None:
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError("video_url part needs video_url.url", param=param)
            videos.append(decode_video(url, image_root, f"{param}.video_url"))
            text += VIDEO_TOKEN + "\n"
        else:
            raise APIError("each part must be {'type': 'text', 'text': ...}, {'type': 'image_url', ...} or "
                           "{'type': 'video_url', ...}", param=param)
    return text


def parse_chat_request(body: Any, image_root: Optional[Path] = None) -> ChatRequest:
    """Validate an OpenAI chat completion body; APIError names the bad field."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages", code="invalid_value")
    turns: List[Turn] = []
    images: List[Image.Image] = []
    videos: List[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(f"each message needs a role in {list(ROLES)}", param=f"messages[{i}].role")
        if message["role"] == "system" and i:
            raise APIError("a system message may only come first", param=f"messages[{i}].role")
        turns.append(Turn(message["role"], _content(message.get("content"), i, image_root, images, videos)))
    if turns[-1].role != "user":
        raise APIError("the last message must be the user's", param=f"messages[{len(turns) - 1}].role")
    if body.get("n", 1) != 1:
        raise APIError("only n=1 is supported", param="n", code="invalid_value")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": given}, "max_tokens", 256, 1, MAX_TOKENS_LIMIT, integer=True)
    return ChatRequest(
        sample=Sample(id="request", turns=turns, images=images, videos=videos),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)),
        stop=stop, stream=stream, model=body.get("model"), max_tokens_given=given is not None,
    )


def frame_counts_of(processor, sample: Sample) -> List[int]:
    """The sampled frame count of each of a request's videos; a 400 naming the video part when one
    cannot be decoded, has no frame, or the model takes no video."""
    try:
        counts = processor.frame_counts(sample)
        if counts and processor.num_frame_tokens is None:
            raise ValueError("this model takes no video: its visual tokens form no grid to pool")
        return counts
    except (ImageLoadError, ValueError) as exc:
        raise APIError(f"cannot use the video: {exc}", param="messages", code="invalid_video") from None
