"""A stage's data written as shards with images embedded: webdataset tars or parquet, a manifest.

Every dataset entry of the stage (any format) is read one record at a time (a sharded source
shard by shard, never whole), its first ``max_samples`` kept (``repeat`` is a training weight,
recorded, not written out), and written in order into shards of ``shard_size`` samples:
``NNNNNN.tar`` (members ``KEY.json``: ``{"id", "conversations", "images", "meta"}``, and the
images ``KEY.0.png``... as their original bytes) or ``NNNNNN.parquet`` (columns ``id``,
``conversations``, ``images`` (an HF ``Image`` list), ``meta`` as JSON). ``manifest.json`` holds
the counts per source, each shard's samples, bytes and sha256, and every skipped record with
its reason (an image file that cannot be read, a record the reader refused); nothing else is lost.
Readers take such a folder back as ``{format: webdataset, args: {shards: "DIR/{000000..N}.tar"}}``
or ``{format: hf_dataset, args: {path: DIR}}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from tqdm.auto import tqdm

from vlm.core.errors import ConfigError
from vlm.data.formats import SHARDED, read_dataset
from vlm.data.shards import IMAGE_EXTENSIONS, MANIFEST, Skipped
from vlm.data.types import EmbeddedImage, Sample

TARGETS = ("webdataset", "hf_dataset")
_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}


def stage_records(data_cfgs, image_token: str) -> Iterator[tuple]:
    """(entry index, record) for every dataset entry of a stage, a sharded one read shard by
    shard, each cut to its ``max_samples``."""
    for index, data in enumerate(data_cfgs):
        args = {k: v for k, v in dict(data.args).items() if k != "streaming"}
        if data.format in SHARDED:
            records = (r for shard in SHARDED[data.format](**args, image_token=image_token) for r in shard.records())
        else:
            records = iter(read_dataset(data.format, image_token=image_token, **args))
        for n, record in enumerate(records):
            if data.max_samples and n >= data.max_samples:
                break
            yield index, record


def _image_member(image: str) -> tuple:
    """(extension, bytes) of one image: an embedded one's bytes or the file's, re-encoded as PNG
    only when its extension is not one readers take."""
    data = image.data if isinstance(image, EmbeddedImage) else Path(image).read_bytes()
    ext = os.path.splitext(str(image))[1].lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in IMAGE_EXTENSIONS:
        from PIL import Image

        buffer = io.BytesIO()
        with Image.open(io.BytesIO(data)) as decoded:
            decoded.save(buffer, format="PNG")
        ext, data = "png", buffer.getvalue()
    return ext, data


def sample_record(sample: Sample) -> Dict[str, Any]:
    """The JSON metadata of a converted sample (LLaVA ``conversations``; ``meta`` minus images)."""
    meta = {k: v for k, v in sample.meta.items() if k != "source"}
    meta["origin"] = sample.meta.get("source", sample.id)
    return {"id": sample.id, "conversations": [{"from": _ROLES[t.role], "value": t.content} for t in sample.turns],
            "meta": meta}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Writer:
    """Cuts records into shards and keeps the manifest's counts."""

    out: Path
    target: str
    shard_size: int
    shards: List[Dict[str, Any]] = field(default_factory=list)
    pending: List[tuple] = field(default_factory=list)

    def add(self, key: str, record: Dict[str, Any], images: Sequence[tuple]) -> None:
        self.pending.append((key, record, images))
        if len(self.pending) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        ext = "tar" if self.target == "webdataset" else "parquet"
        path = self.out / f"{len(self.shards):06d}.{ext}"
        (self._write_tar if self.target == "webdataset" else self._write_parquet)(path)
        self.shards.append({"file": path.name, "samples": len(self.pending), "bytes": path.stat().st_size,
                            "sha256": _sha256(path)})
        self.pending = []

    def _write_tar(self, path: Path) -> None:
        import webdataset as wds

        with wds.TarWriter(str(path)) as tar:
            for key, record, images in self.pending:
                names = [f"{i}.{ext}" for i, (ext, _) in enumerate(images)]
                member = {"__key__": key, "json": json.dumps({**record, "images": names}).encode()}
                member.update({name: data for name, (_, data) in zip(names, images)})
                tar.write(member)

    def _write_parquet(self, path: Path) -> None:
        import datasets

        features = datasets.Features({
            "id": datasets.Value("string"),
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()),
            "meta": datasets.Value("string"),
        })
        rows = {"id": [], "conversations": [], "images": [], "meta": []}
        for _, record, images in self.pending:
            rows["id"].append(record["id"])
            rows["conversations"].append(record["conversations"])
            rows["images"].append([{"bytes": data, "path": None} for _, data in images])
            rows["meta"].append(json.dumps(record["meta"]))
        import pyarrow.parquet as pq

        # the table carries the HF features in its schema metadata, so datasets reads the images back
        pq.write_table(datasets.Dataset.from_dict(rows, features=features).data.table, str(path))


def convert_stage(data_cfgs, image_token: str, out: str | Path, target: str, shard_size: int = 10000,
                  progress: bool = True) -> Dict[str, Any]:
    """Write every sample of ``data_cfgs`` (a stage's ``data``) under ``out`` as ``target`` shards
    of ``shard_size`` samples; returns the manifest, also written as ``out/manifest.json``."""
    if target not in TARGETS:
        raise ConfigError(f"--to {target!r}: expected one of {', '.join(TARGETS)}")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size}: must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out, target, shard_size)
    sources = [{"format": d.format, "samples": 0, "skipped": 0, "repeat": d.repeat} for d in data_cfgs]
    skipped: List[Dict[str, str]] = []
    written = 0
    for index, record in tqdm(stage_records(data_cfgs, image_token), desc=f"converting to {target}",
                              disable=not progress, unit=" samples"):
        reason: Optional[str] = record.reason if isinstance(record, Skipped) else None
        where = record.where if isinstance(record, Skipped) else record.meta.get("source", record.id)
        images: List[tuple] = []
        if reason is None:
            try:
                images = [_image_member(image) for image in record.images]
            except Exception as exc:  # a missing or unreadable image file: recorded, not fatal
                reason = f"cannot read image: {exc}"
        if reason is not None:
            sources[index]["skipped"] += 1
            skipped.append({"where": str(where), "reason": reason})
            continue
        writer.add(f"{written:09d}", sample_record(record), images)
        sources[index]["samples"] += 1
        written += 1
    writer.flush()
    manifest = {"format": target, "samples": written, "shard_size": shard_size, "sources": sources,
                "shards": writer.shards, "skipped": skipped,
                "bytes": sum(s["bytes"] for s in writer.shards)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def reader_entry(manifest: Dict[str, Any], out: str | Path) -> Dict[str, Any]:
    """The dataset entry that reads a converted folder back."""
    if manifest["format"] == "webdataset":
        last = len(manifest["shards"]) - 1
        return {"format": "webdataset", "args": {"shards": f"{out}/{{000000..{last:06d}}}.tar"}}
    return {"format": "hf_dataset", "args": {"path": str(out), "streaming": True}}
