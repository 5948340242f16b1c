"""Tokenised samples cached on disk, keyed by the data, template, tokenizer and processor options.

Tokenising a stage's samples up front (:class:`vlm.data.dataset.ConversationDataset`) is what
a large run spends its first hours on; this cache keeps the result, so a later stage, run or
resume on the same data skips it. An entry is one ``.npz`` file (token ids and labels end to
end, offsets, and the key) under ``<root>/tokenized/<ab>/<key>.npz``; the root is
``token_cache_dir``, else ``$VLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlm``, else ``~/.cache/vlm``.

The key hashes everything the token ids depend on: the samples as read from the data files (ids,
roles and texts, image counts, in order: a changed file, reader argument, ``max_samples`` or
``repeat`` changes it), the tokenizer's files as ``save_pretrained`` writes them (the image
token included), the template (class, settings, source code), the processor's image-token
settings and source code, and this module's format. ``max_length`` is not part of it: the cache
holds the untruncated ids, and the dataset's truncation rules run on them (cheap).

Entries are written atomically (temporary file, then ``os.replace``) and checked on load (key
and a digest of their arrays); an unreadable or mismatched entry is rebuilt with a warning.
Under several processes the local main process of each node builds (with a progress bar) and
the others wait at ``wait`` and then read it.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from vlm.data.types import Sample

logger = logging.getLogger(__name__)

CACHE_ENV = "VLM_CACHE_DIR"
SUBDIR = "tokenized"
FORMAT = 1
Encoded = Tuple[List[int], List[int]]


def default_cache_root() -> Path:
    """``$VLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/vlm``, else ``~/.cache/vlm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vlm"


def samples_digest(samples: Sequence[Sample]) -> str:
    """A digest of what tokenisation reads of ``samples``, in order: id, roles and texts, image count."""
    h = hashlib.sha256()
    for sample in samples:
        record = [sample.id, [[t.role, t.content] for t in sample.turns], len(sample.images)]
        h.update(json.dumps(record, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A digest of the tokenizer's files (``save_pretrained`` into a temporary folder): vocab,
    merges, added tokens (the image token) and settings."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(folder)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def _source(cls) -> str:
    try:
        return hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
    except (OSError, TypeError):  # no source at hand (a frozen install): the class name stands in
        return f"{cls.__module__}.{cls.__qualname__}"


def _settings(obj) -> dict:
    """An object's plain attributes (numbers, strings, lists, mappings), sorted; the rest left out."""
    plain = (str, int, float, bool, type(None), list, tuple, dict)
    return {k: v for k, v in sorted(vars(obj).items()) if isinstance(v, plain)}


def cache_key(samples: Sequence[Sample], processor) -> Tuple[str, dict]:
    """The key of ``samples`` tokenised by ``processor`` and the description it hashes."""
    template = processor.template
    description = {
        "format": FORMAT,
        "samples": {"count": len(samples), "digest": samples_digest(samples)},
        "tokenizer": tokenizer_digest(processor.tokenizer),
        "template": {"class": f"{type(template).__module__}.{type(template).__qualname__}",
                     "settings": _settings(template), "source": _source(type(template))},
        "processor": {"class": f"{type(processor).__module__}.{type(processor).__qualname__}",
                      "num_image_tokens": processor.num_image_tokens, "image_token": processor.image_token,
                      "image_token_id": processor.image_token_id, "source": _source(type(processor))},
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), description


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed into place: a crash leaves the
    old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _arrays_digest(ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> str:
    h = hashlib.sha256()
    for array in (ids, labels, offsets):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class TokenCache:
    """The entries under ``root/tokenized``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the entry of ``key`` lives."""
        return self.root / SUBDIR / key[:2] / f"{key}.npz"

    def save(self, key: str, encoded: Sequence[Encoded]) -> Path:
        """Write ``encoded`` (``(ids, labels)`` per sample) as the entry of ``key``, atomically."""
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for ids, _ in encoded for t in ids), dtype=np.int64, count=int(offsets[-1]))
        labels = np.fromiter((t for _, labels in encoded for t in labels), dtype=np.int64, count=int(offsets[-1]))
        meta = json.dumps({"key": key, "format": FORMAT, "digest": _arrays_digest(ids, labels, offsets)})
        buffer = io.BytesIO()
        np.savez(buffer, ids=ids, labels=labels, offsets=offsets, meta=np.frombuffer(meta.encode(), dtype=np.uint8))
        path = self.path(key)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def load(self, key: str, count: int) -> Optional[List[Encoded]]:
        """The entry of ``key`` (``count`` samples), None when there is none; ValueError when it is
        unreadable or does not match (wrong key, count or digest)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as entry:
                meta = json.loads(entry["meta"].tobytes().decode())
                ids, labels, offsets = entry["ids"], entry["labels"], entry["offsets"]
        except Exception as exc:  # a truncated zip, a flipped byte, a missing array: all rebuildable
            raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
        if meta.get("key") != key or meta.get("format") != FORMAT:
            raise ValueError("written for another key")
        if len(offsets) != count + 1 or len(ids) != len(labels) or int(offsets[-1]) != len(ids):
            raise ValueError("its arrays do not fit the samples")
        if meta.get("digest") != _arrays_digest(ids, labels, offsets):
            raise ValueError("its content does not match its digest")
        bounds = offsets.tolist()
        ids_list, labels_list = ids.tolist(), labels.tolist()
        return [(ids_list[a:b], labels_list[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def tokenize_all(samples: Sequence[Sample], processor, name: str = "data", progress: bool = True) -> List[Encoded]:
    """``processor.tokenize`` of every sample, with a progress bar."""
    return [processor.tokenize(sample.turns)
            for sample in tqdm(samples, desc=f"tokenizing {name}", disable=not progress, leave=False)]


def cached_tokenize(samples: Sequence[Sample], processor, root: str | Path, name: str = "data",
                    progress: bool = True, builder: bool = True,
                    wait: Optional[Callable[[], None]] = None) -> List[Encoded]:
    """Every sample's ``(ids, labels)``, from the cache under ``root`` when it holds them, else
    tokenised and stored. ``builder``: this process builds (the local main one); ``wait``: a
    barrier every process calls once (the others read after it)."""
    cache = TokenCache(root)
    key, _ = cache_key(samples, processor)
    path = cache.path(key)

    def read() -> Optional[List[Encoded]]:
        try:
            return cache.load(key, len(samples))
        except ValueError as exc:
            logger.warning("%s: token cache entry %s %s; rebuilding it", name, path, exc)
            return None

    encoded = None
    if builder:
        encoded = read()
        if encoded is None:
            encoded = tokenize_all(samples, processor, name, progress)
            try:
                cache.save(key, encoded)
                logger.info("%s: tokenization built: %d samples, cached in %s", name, len(samples), path)
            except OSError as exc:  # a read-only or full disk: the run goes on without the cache
                logger.warning("%s: token cache not written (%s): %s", name, path, exc)
        else:
            logger.info("%s: tokenization skipped: reused the cache entry %s (%d samples)", name, path,
                        len(samples))
    if wait is not None:
        wait()
    if encoded is None:  # a process that waited for the builder
        encoded = read()
        if encoded is None:  # the cache folder is not shared with the builder: tokenise here
            encoded = tokenize_all(samples, processor, name, progress=False)
    return encoded
