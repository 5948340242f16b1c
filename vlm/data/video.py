"""Video frames: decoded with PyAV (mp4, webm, gif) or read from a folder, sampled by count or fps."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from vlm.core.errors import ImageLoadError
from vlm.data.images import DEFAULT_MAX_PIXELS, open_image, to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video the model sees: ``num_frames`` spread evenly over the clip, or,
    with ``fps`` set, one frame every ``1 / fps`` seconds, at most ``num_frames``."""

    num_frames: int = 8
    fps: Optional[float] = None

    def indices(self, total: int, native_fps: Optional[float]) -> List[int]:
        """The frame indices kept out of ``total`` (empty for an empty video)."""
        if total <= 0:
            return []
        if self.fps is not None and native_fps:
            step = native_fps / self.fps  # native frames per sampled frame
            count = min(self.num_frames, max(1, int(math.floor((total - 1) / step)) + 1))
            return [min(total - 1, int(round(i * step))) for i in range(count)]
        count = min(self.num_frames, total)
        # evenly spread, first and last frame included (LLaVA-Video's linspace)
        return [int(round(x)) for x in np.linspace(0, total - 1, count)]


def is_frame_folder(source: Any) -> bool:
    """Whether ``source`` names a folder of frame images (sorted by name)."""
    return isinstance(source, (str, os.PathLike)) and os.path.isdir(source)


def _folder_frames(folder: str) -> List[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(FRAME_SUFFIXES))


def probe(source: Any) -> Tuple[int, Optional[float]]:
    """``(frame count, frames per second or None)`` of a video file (a path or an in-memory file
    object), a folder of frames or a list of in-memory frames; ImageLoadError naming the video when it cannot be read."""
    if isinstance(source, (list, tuple)):
        return len(source), None
    if is_frame_folder(source):
        return len(_folder_frames(os.fspath(source))), None
    try:
        with _open(source) as container:
            stream = _video_stream(container, source)
            rate = float(stream.average_rate) if stream.average_rate else None
            total = int(stream.frames or 0)
            if total <= 0:  # no frame count in the header (gif, some webm): count by decoding
                total = sum(1 for _ in container.decode(stream))
            return total, rate
    except ImageLoadError:
        raise
    except Exception as exc:  # PyAV raises many kinds for a missing or corrupt file
        raise ImageLoadError(f"cannot read video {video_name(source)}: {exc}") from exc


def read_frames(source: Any, sampling: FrameSampling, max_pixels: int = DEFAULT_MAX_PIXELS) -> List[Image.Image]:
    """The sampled frames of ``source`` (a video file, a folder of frames or a list of PIL
    frames) as RGB images; ImageLoadError naming the video when it cannot be decoded or has no
    frame."""
    total, rate = probe(source)
    keep = sampling.indices(total, rate)
    if not keep:
        raise ImageLoadError(f"video {video_name(source)}: 0 frames")
    if isinstance(source, (list, tuple)):
        return [to_rgb(source[i]) for i in keep]
    if is_frame_folder(source):
        paths = _folder_frames(os.fspath(source))
        return [to_rgb(open_image(paths[i], max_pixels)) for i in keep]
    wanted = set(keep)
    frames = {}
    try:
        with _open(source) as container:
            stream = _video_stream(container, source)
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    if frame.width * frame.height > max_pixels:
                        raise ImageLoadError(f"video {video_name(source)}: {frame.width} x {frame.height} frames, more than "
                                             f"the limit of {max_pixels} pixels (max_image_pixels)")
                    frames[index] = frame.to_image().convert("RGB")
                if index >= keep[-1]:
                    break
    except ImageLoadError:
        raise
    except Exception as exc:
        raise ImageLoadError(f"cannot decode video {video_name(source)}: {exc}") from exc
    if len(frames) < len(wanted):  # the header promised more frames than the stream holds
        raise ImageLoadError(f"video {video_name(source)}: {len(frames)} of {len(wanted)} sampled frames could be decoded")
    return [frames[i] for i in keep]


def write_video(path: str, frames: Sequence[Image.Image], fps: int = 4) -> None:
    """Write RGB ``frames`` as a video: ``.mp4`` (MPEG-4 part 2, near-lossless) or ``.webm``
    (VP8) with PyAV, ``.gif`` with PIL (an adaptive palette; PyAV's gif encoder wants one too)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".gif":
        frames[0].save(path, save_all=True, append_images=list(frames[1:]), duration=int(1000 / fps), loop=0)
        return
    codec = {".mp4": "mpeg4", ".webm": "libvpx"}.get(suffix)
    if codec is None:
        raise ValueError(f"{path}: write .gif, .mp4 or .webm")
    av = _av()
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {"crf": "4", "b": "1M"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image.convert("RGB"))):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _video_stream(container, source):
    if not container.streams.video:
        raise ImageLoadError(f"video {video_name(source)}: no video stream")
    return container.streams.video[0]


def video_name(source: Any) -> str:
    """How an error names a video: its path, or what it is when it is held in memory."""
    if isinstance(source, (list, tuple)):
        return f"<{len(source)} frames in memory>"
    return "<video data in memory>" if hasattr(source, "read") else os.fspath(source)


def _open(source: Any):
    """A PyAV container for a video path or an in-memory file (rewound: it is read twice)."""
    if hasattr(source, "read"):
        source.seek(0)
        return _av().open(source)
    return _av().open(os.fspath(source))


def _av():
    try:
        import av
    except ImportError as exc:  # a runtime dependency; a broken install says so once
        raise ImageLoadError(f"reading videos needs PyAV (pip install av): {exc}") from exc
    return av
