"""Sharded sources: webdataset tars and HF datasets read back as the samples converted into them,
hand-written shards of each kind, and the damaged ones (one line naming shard and key, or a skip)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from vlm.config import DataConfig
from vlm.core.errors import ConfigError, DataFormatError
from vlm.data.convert import convert_stage
from vlm.data.formats import hf_shards, read_dataset, read_samples, webdataset_shards
from vlm.data.shards import Skipped
from vlm.data.types import EmbeddedImage


def entry(format, **args):
    cfg = OmegaConf.structured(DataConfig)
    cfg.format, cfg.args = format, args
    return cfg


def shapes_entries(shapes):
    train = shapes["train"]
    return [entry("coco_captions", path=train["captions"], image_root=train["image_root"]),
            entry("vqav2", questions_path=train["questions"], annotations_path=train["annotations"],
                  image_root=train["image_root"], image_pattern=train["image_pattern"]),
            entry("llava_json", path=train["conversations"], image_root=train["image_root"])]


def png_bytes(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: dict) -> str:
    """A tar shard with ``members`` (name -> bytes) in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("target", ["webdataset", "hf_dataset"])
def test_convert_then_read_back_gives_the_same_samples_and_image_bytes(tmp_path, shapes_data, target):
    entries = shapes_entries(shapes_data)
    original = read_samples(entries, "<image>")
    manifest = convert_stage(entries, "<image>", tmp_path / "out", target, shard_size=7, progress=False)
    assert manifest["samples"] == len(original) == sum(s["samples"] for s in manifest["sources"])
    assert [s["samples"] for s in manifest["shards"]] == [7] * (len(original) // 7) + (
        [len(original) % 7] if len(original) % 7 else [])
    for shard in manifest["shards"]:  # sizes and checksums of what is on disk
        data = (tmp_path / "out" / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest

    if target == "webdataset":
        last = len(manifest["shards"]) - 1
        back = read_dataset("webdataset", image_token="<image>", shards=f"{tmp_path}/out/{{000000..{last:06d}}}.tar")
    else:
        back = read_dataset("hf_dataset", image_token="<image>", path=str(tmp_path / "out"))
    assert len(back) == len(original)
    for a, b in zip(original, back):
        assert [(t.role, t.content) for t in a.turns] == [(t.role, t.content) for t in b.turns]
        assert all(isinstance(i, EmbeddedImage) for i in b.images)
        assert [Path(p).read_bytes() for p in a.images] == [i.data for i in b.images]


def test_hand_written_webdataset_captions_vqa_and_multi_image(tmp_path):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255))
    shard = write_tar(tmp_path / "a.tar", {
        "s1.jpg": red, "s1.txt": b"a red square",
        "s2.png": blue, "s2.json": json.dumps({"question": "What colour?", "answer": "blue"}).encode(),
        "s3.0.png": red, "s3.1.png": blue,
        "s3.json": json.dumps({"conversations": [{"from": "human", "value": "<image> <image> differ?"},
                                                 {"from": "gpt", "value": "yes"}]}).encode(),
    })
    (only,) = webdataset_shards(shard, image_token="<image>")
    assert only.count == 3  # from the headers
    caption, vqa, multi = read_dataset("webdataset", image_token="<image>", shards=shard)
    assert caption.turns[1].content == "a red square" and caption.images[0].data == red
    assert vqa.turns[0].content.startswith("<image>\nWhat colour?") and vqa.turns[1].content == "blue"
    assert [i.data for i in multi.images] == [red, blue] and multi.turns[0].content == "<image> <image> differ?"
    assert caption.meta["source"] == f"{shard}#s1"
    assert [r.id for r in only.records(2)] == ["s3"]  # reading from an offset


def test_brace_patterns_and_missing_shards_are_named(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:06d}.tar", {f"k{i}.png": png_bytes(), f"k{i}.txt": b"x"})
    assert len(webdataset_shards(f"{tmp_path}/{{000000..000002}}.tar")) == 3
    with pytest.raises(DataFormatError, match=r"000003.tar does not exist \(1 of 4 missing\)"):
        webdataset_shards(f"{tmp_path}/{{000000..000003}}.tar")
    with pytest.raises(ConfigError, match="no file matches"):
        webdataset_shards(f"{tmp_path}/*.nothing")


def test_truncated_tar_names_the_shard_and_last_key(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", {f"k{i}.{ext}": png_bytes() if ext == "png" else b"caption"
                                              for i in range(4) for ext in ("png", "txt")})
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(whole).read_bytes()[:1800])
    with pytest.raises(DataFormatError, match=r"cut.tar: .*after .*'k\d'"):
        webdataset_shards(str(cut))
    # counted from a conversion manifest, the damage shows when the records are read
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"file": "cut.tar", "samples": 4}]}))
    (shard,) = webdataset_shards(str(cut))
    with pytest.raises(DataFormatError, match=r"cut.tar: truncated or corrupt tar shard after key 'k\d'"):
        list(shard.records())


def test_shard_missing_an_image_member_is_a_named_skip(tmp_path, caplog):
    shard = write_tar(tmp_path / "a.tar", {
        "ok.png": png_bytes(), "ok.txt": b"fine",
        "gone.json": json.dumps({"caption": "x", "images": ["png"]}).encode(),
        "bare.jpg": png_bytes(),
    })
    records = list(webdataset_shards(shard, image_token="<image>")[0].records())
    assert [type(r).__name__ for r in records] == ["Sample", "Skipped", "Skipped"]
    assert records[1] == Skipped(f"{shard}#gone", "missing image member(s) gone.png")
    assert records[2].where == f"{shard}#bare" and "no bare.json or bare.txt" in records[2].reason
    with caplog.at_level("WARNING"):
        assert len(read_dataset("webdataset", image_token="<image>", shards=shard)) == 1
    assert f"skipping {shard}#gone: missing image member(s) gone.png" in caplog.text


def test_parquet_with_a_wrong_column_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"id": ["a"], "label": ["cat"]}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataFormatError, match=r"bad.parquet: no text column .*found columns \['id', 'label'\]"):
        hf_shards(str(tmp_path / "bad.parquet"))
    with pytest.raises(ConfigError, match="no such file or folder"):
        hf_shards(str(tmp_path / "none.parquet"))
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "bad.parquet").read_bytes()[:40])
    with pytest.raises(DataFormatError, match=r"cut.parquet: cannot read the file's metadata"):
        hf_shards(str(tmp_path / "cut.parquet"))


def test_hf_dataset_save_to_disk_folder_with_images(tmp_path):
    import datasets

    red = png_bytes()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": red, "path": None}] * 3, "caption": ["a", "b", "c"]},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    shards = hf_shards(str(tmp_path / "saved"), image_token="<image>")
    assert sum(s.count for s in shards) == 3
    samples = read_dataset("hf_dataset", image_token="<image>", path=str(tmp_path / "saved"))
    assert [s.turns[1].content for s in samples] == ["a", "b", "c"] and samples[0].images[0].data == red
    assert [r.turns[1].content for r in shards[0].records(2)] == ["c"]  # reading from an offset
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) for i in range(3)))
    (only,) = hf_shards(str(lines), image_token="<image>")
    assert only.count == 3 and [r.turns[1].content for r in only.records(1)] == ["a1", "a2"]
