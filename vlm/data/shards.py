"""Sharded sources: webdataset tars and HF dataset files, read shard by shard, images as bytes.

A sharded source is a list of :class:`Shard` s (a tar file, a parquet / arrow / JSON-lines file),
each knowing only its sample count (from its headers or metadata, never a per-record index) and
how to read its records from an offset. A record is a :class:`~vlm.data.types.Sample` whose images
are :class:`~vlm.data.types.EmbeddedImage` s (bytes, decoded only when trained on), or a
:class:`Skipped` naming the shard, the key and the reason (a record without metadata, a missing
image member), which the loader counts.

Records map to samples by their fields: ``conversations`` (LLaVA turns), else ``question`` with
``answer`` (VQA), else ``caption`` / ``txt`` / ``text`` (a caption). Webdataset members with the
extensions jpg, jpeg, png or webp are the record's images, in the order of their suffixes
(``key.jpg``, or ``key.0.png``, ``key.1.png``); metadata is ``key.json`` and / or ``key.txt``.
HF datasets take their images from an ``image`` or ``images`` column (an HF ``Image`` feature,
bytes, or ``{"bytes": ...}``).

:mod:`vlm.data.formats` registers the readers (``format: webdataset``, ``format: hf_dataset``)
built on these, which hand in how a LLaVA conversation record becomes a sample (``conversation``)
and the prompts of captions and questions; a streaming stage reads the shards themselves
(:mod:`vlm.data.streaming`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.types import (
    EmbeddedImage,
    Sample,
    Turn,
    image_marker,
    marking_images_with,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"  # what `vlm data convert` writes beside its shards (counts per shard)


@dataclass(frozen=True)
class Skipped:
    """A record that cannot be trained on: ``where`` (shard and key) and why."""

    where: str
    reason: str


Record = Union[Sample, Skipped]


@dataclass(frozen=True)
class Shard:
    """One file of a sharded source: its path, its sample count, and ``read(shard, start)``, which
    yields its records from the ``start``-th on."""

    path: str
    count: int
    read: Callable[["Shard", int], Iterator[Record]] = field(compare=False, repr=False)
    options: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def records(self, start: int = 0) -> Iterator[Record]:
        """The records from the ``start``-th on."""
        return self.read(self, start)


# --------------------------------------------------------------------------------------------
# records -> samples


def source_options(prompt: str, vqa_prompt_suffix: str, conversation: Callable[..., Sample],
                  image_token: Optional[str] = None) -> Dict[str, Any]:
    """What a sharded source needs to make samples: the caption ``prompt``, the suffix of VQA
    questions, ``conversation(record, where, image_root, default_id)`` (a LLaVA record -> Sample)
    and the image marker of its texts (default: the current one)."""
    return {"prompt": prompt, "vqa_prompt_suffix": vqa_prompt_suffix, "conversation": conversation,
            "image_token": image_token or image_marker()}


def _image_sample(where: str, sample_id: str, images: List[EmbeddedImage], meta: Dict[str, Any],
                  opts: Dict[str, Any]) -> Record:
    """A Sample (or Skipped) from a record's decoded metadata ``meta`` and its ``images``."""
    prompt, vqa_suffix = opts["prompt"], opts["vqa_prompt_suffix"]
    try:
        if isinstance(meta.get("conversations"), list):
            record = {"id": meta.get("id", sample_id), "conversations": meta["conversations"]}
            if images:
                record["image"] = list(images)
            sample = opts["conversation"](record, where, None, sample_id)
            sample.meta.update({k: v for k, v in meta.items() if k not in ("conversations", "image", "images")})
            sample.meta["source"] = where
            return sample
        marker = f"{image_marker()}\n" * len(images)
        sid = str(meta.get("id", sample_id))
        if isinstance(meta.get("question"), str) and isinstance(meta.get("answer"), str):
            turns = [Turn("user", f"{marker}{meta['question']}{vqa_suffix}"), Turn("assistant", meta["answer"])]
            extra = {k: v for k, v in meta.items() if k not in ("question", "answer")}
            return Sample(sid, turns, list(images), {**extra, "question": meta["question"], "source": where})
        for key in ("caption", "txt", "text"):
            if isinstance(meta.get(key), str):
                turns = [Turn("user", f"{marker}{prompt}"), Turn("assistant", meta[key].strip())]
                return Sample(sid, turns, list(images), {"source": where})
    except DataFormatError as exc:
        return Skipped(where, str(exc).split(": ", 1)[-1])
    return Skipped(where, f"no 'conversations', 'question' + 'answer' or 'caption' / 'txt' field; found "
                          f"{sorted(meta)}")


# --------------------------------------------------------------------------------------------
# webdataset


def _split_name(name: str):
    """(key, suffix) of a tar member as webdataset groups them: the key is up to the first dot of
    the base name."""
    folder, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, suffix = base.split(".", 1)
    return os.path.join(folder, stem), suffix.lower()


def _tar_count(path: str) -> int:
    """How many keys (samples) a tar shard holds, from its member headers only."""
    keys, last = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                tar.members = []  # keep memory flat on large shards
                key, _ = _split_name(info.name)
                if info.isreg() and key is not None and key != last:
                    keys, last = keys + 1, key
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable tar shard ({exc}); after {keys} sample(s) "
                              f"(last key {last!r}); re-create or remove the shard") from None
    return keys


def _tar_groups(path: str) -> Iterator[tuple]:
    """(key, {suffix: bytes}) of a tar shard in file order; DataFormatError naming the shard and
    the last key read when it is truncated or corrupt."""
    key, members, last = None, {}, None
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                name_key, suffix = _split_name(info.name)
                if name_key is None:
                    continue
                data = tar.extractfile(info).read()
                if name_key != key and key is not None:
                    last = key
                    yield key, members
                    members = {}
                key = name_key
                members[suffix] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataFormatError(f"{path}: truncated or corrupt tar shard after key {key or last!r} ({exc}); "
                              "re-create or remove the shard") from None
    if key is not None:
        yield key, members


def _read_tar(shard: Shard, start: int) -> Iterator[Record]:
    opts = shard.options
    for index, (key, members) in enumerate(_tar_groups(shard.path)):
        if index < start:
            continue
        where = f"{shard.path}#{key}"
        images = [EmbeddedImage(f"{where}.{suffix}", members[suffix])
                  for suffix in sorted(members) if suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        meta: Dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield Skipped(where, f"{key}.json is not valid UTF-8 JSON ({exc})")
                continue
            if not isinstance(meta, dict):
                yield Skipped(where, f"{key}.json is not an object")
                continue
        if "txt" in members and "txt" not in meta:
            meta["txt"] = members["txt"].decode("utf-8", errors="replace")
        if not meta:
            yield Skipped(where, f"no {key}.json or {key}.txt metadata (members: {sorted(members)})")
            continue
        wanted = meta.get("images")
        if isinstance(wanted, list):  # the metadata names its image members: each must be there
            missing = [s for s in wanted if s not in members]
            if missing:
                yield Skipped(where, f"missing image member(s) {', '.join(f'{key}.{s}' for s in missing)}")
                continue
            images = [EmbeddedImage(f"{where}.{s}", members[s]) for s in wanted]
        with marking_images_with(opts["image_token"]):
            sample = _image_sample(where, key, images, meta, opts)
        if isinstance(sample, Sample) and sample.images and not images:
            sample = Skipped(where, "missing image member")
        yield sample


def expand_shards(pattern: str) -> List[str]:
    """The files a shard pattern names: brace ranges / lists (``{000000..000009}``, ``{a,b}``)
    and shell globs; ConfigError when it names none, DataFormatError for a missing file."""
    from braceexpand import braceexpand

    paths: List[str] = []
    for part in braceexpand(os.fspath(pattern)):
        matched = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        paths.extend(matched)
    if not paths:
        raise ConfigError(f"shards {pattern!r}: no file matches")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataFormatError(f"shards {pattern!r}: {missing[0]} does not exist ({len(missing)} of {len(paths)} "
                              "missing)")
    return paths


def _manifest_counts(paths: Sequence[str]) -> Dict[str, int]:
    """Sample counts per shard from the ``manifest.json`` of ``vlm data convert`` beside them."""
    counts: Dict[str, int] = {}
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        manifest = os.path.join(folder, MANIFEST)
        if os.path.isfile(manifest):
            with open(manifest) as f:
                for entry in json.load(f).get("shards", []):
                    counts[os.path.join(folder, entry["file"])] = int(entry["samples"])
    return counts


def tar_shards(shards: Union[str, Sequence[str]], options: Dict[str, Any]) -> List[Shard]:
    """The tar shards ``shards`` names (a path, a brace pattern, a glob, or a list of them), with
    their sample counts (from the conversion manifest beside them, else from the tar headers);
    ``options``: :func:`source_options`."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    paths = [p for pattern in patterns for p in expand_shards(pattern)]
    known = _manifest_counts(paths)
    return [Shard(p, known.get(os.path.abspath(p)) or _tar_count(p), _read_tar, options) for p in paths]


# --------------------------------------------------------------------------------------------
# HF datasets


def _hf_files(path: str) -> List[str]:
    """The data files of an HF dataset location: a ``save_to_disk`` folder (its arrow files), a
    folder of parquet / arrow / JSON-lines files, one such file, or a glob."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "state.json")
        if os.path.isfile(state):  # save_to_disk
            with open(state) as f:
                return [os.path.join(path, entry["filename"]) for entry in json.load(f)["_data_files"]]
        for ext in ("parquet", "arrow", "jsonl"):
            files = sorted(glob.glob(os.path.join(path, "**", f"*.{ext}"), recursive=True))
            if files:
                return files
        raise ConfigError(f"hf_dataset path {path}: no save_to_disk state.json and no parquet, arrow or jsonl file")
    files = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise ConfigError(f"hf_dataset path {path}: no such file or folder")
    return files


def _hf_count(path: str) -> int:
    """Rows of one data file, from its metadata (parquet footer, arrow batches, lines)."""
    ext = path.rsplit(".", 1)[-1]
    try:
        if ext == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if ext == "arrow":
            import pyarrow as pa

            with pa.memory_map(path) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                    return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                return sum(batch.num_rows for batch in reader)
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except Exception as exc:  # pyarrow raises many types for a damaged file
        raise DataFormatError(f"{path}: cannot read the file's metadata ({exc})") from None


def _hf_columns(path: str) -> List[str]:
    ext = path.rsplit(".", 1)[-1]
    if ext == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    return []


TEXT_COLUMNS = ("conversations", "question", "caption", "text", "txt")


def _cell_image(value: Any, where: str, index: int) -> Optional[EmbeddedImage]:
    if value is None:
        return None
    if isinstance(value, dict) and value.get("bytes") is not None:
        value = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        with open(value["path"], "rb") as f:
            value = f.read()
    if isinstance(value, (bytes, bytearray)):
        return EmbeddedImage(f"{where}.image{index}", bytes(value))
    if hasattr(value, "save"):  # a decoded PIL image
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return EmbeddedImage(f"{where}.image{index}", buffer.getvalue())
    raise DataFormatError(f"{where}: image {index} has type {type(value).__name__}, expected bytes or an image")


def _batches_from(batches: Iterator[Any], start: int) -> Iterator[Dict[str, Any]]:
    """The rows of a file's record batches (pyarrow), from the ``start``-th on; batches before
    it are passed over without converting them."""
    seen = 0
    for batch in batches:
        if seen + batch.num_rows > start:
            yield from batch.slice(max(0, start - seen)).to_pylist()
        seen += batch.num_rows


def _hf_rows(path: str, start: int) -> Iterator[Dict[str, Any]]:
    """The rows of one data file from the ``start``-th on, a record batch / row group at a time.
    pyarrow reads the files ``datasets`` writes; ``datasets``' own streaming splits itself over
    DataLoader workers by file, which the streaming dataset's slots already do."""
    ext = path.rsplit(".", 1)[-1]
    if ext == "parquet":
        import pyarrow.parquet as pq

        yield from _batches_from(pq.ParquetFile(path).iter_batches(batch_size=256), start)
    elif ext == "arrow":
        import pyarrow as pa

        with pa.memory_map(path) as source:
            try:
                reader = pa.ipc.open_stream(source)
                yield from _batches_from(iter(reader), start)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                yield from _batches_from((reader.get_batch(i) for i in range(reader.num_record_batches)), start)
    else:
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(line for line in f if line.strip()):
                if index >= start:
                    yield json.loads(line)


def _read_hf(shard: Shard, start: int) -> Iterator[Record]:
    try:
        stream = _hf_rows(shard.path, start)
        yield from _hf_records(shard, stream, start)
    except DataFormatError:
        raise
    except Exception as exc:  # pyarrow / json raise many types for a damaged file
        raise DataFormatError(f"{shard.path}: cannot read the file ({type(exc).__name__}: {exc}); re-create or "
                              "remove it") from None


def _hf_records(shard: Shard, stream: Iterator[Dict[str, Any]], start: int) -> Iterator[Record]:
    opts = shard.options
    for index, row in enumerate(stream, start=start):
        where = f"{shard.path}#{index}"
        cells = row.get("images") if "images" in row else row.get("image")
        cells = cells if isinstance(cells, list) else ([] if cells is None else [cells])
        try:
            images = [i for n, c in enumerate(cells) if (i := _cell_image(c, where, n)) is not None]
        except DataFormatError as exc:
            yield Skipped(where, str(exc).split(": ", 1)[-1])
            continue
        meta = {k: v for k, v in row.items() if k not in ("image", "images") and v is not None}
        with marking_images_with(opts["image_token"]):
            yield _image_sample(where, str(meta.get("id", f"{os.path.basename(shard.path)}#{index}")), images,
                                meta, opts)


def parquet_shards(path: str, options: Dict[str, Any]) -> List[Shard]:
    """The data files of an HF dataset location as shards with their row counts (``options``:
    :func:`source_options`); DataFormatError naming a file with none of the text columns a sample
    needs."""
    shards = []
    for f in _hf_files(path):
        count = _hf_count(f)
        columns = _hf_columns(f)
        if columns and not any(c in columns for c in TEXT_COLUMNS):
            raise DataFormatError(f"{f}: no text column ({', '.join(TEXT_COLUMNS)}); found columns {columns}")
        shards.append(Shard(f, count, _read_hf, options))
    return shards


# --------------------------------------------------------------------------------------------


def all_samples(shards: Sequence[Shard]) -> List[Sample]:
    """Every record of ``shards`` as a list; skipped records are warned about, one line each."""
    samples: List[Sample] = []
    for shard in shards:
        for record in shard.records():
            if isinstance(record, Skipped):
                logger.warning("skipping %s: %s", record.where, record.reason)
            else:
                samples.append(record)
    return samples
