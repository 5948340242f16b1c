"""The streaming dataset: every sample once per epoch across ranks and DataLoader workers, an order
fixed by seed and epoch, and a resumed iteration that yields exactly the batches not yet seen."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from vlm.data.batch import Collator
from vlm.data.formats import read_samples, webdataset_shards
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlm.data.processor import IGNORE_INDEX, VLMProcessor
from vlm.data.streaming import (
    StreamingConversations,
    limited,
    list_shards,
    stage_shards,
)
from vlm.data.templates import build_template
from vlm.data.types import Sample, Turn


def png_bytes(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, sizes, broken=()) -> list:
    """Tar shards of ``sizes`` samples, captioned ``item N`` (N unique); keys in ``broken`` get an
    image that cannot be decoded."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for index, size in enumerate(sizes):
        path = folder / f"{index:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                key = f"{n:05d}"
                for name, data in ((f"{key}.png", b"not a png" if key in broken else png_bytes(n % 250)),
                                   (f"{key}.json", json.dumps({"caption": f"item {n}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        paths.append(str(path))
    return paths


@pytest.fixture
def processor(tokenizer):
    return VLMProcessor(tokenizer, build_template("plain", tokenizer, None),
                        build_transform("resize", 32, CLIP_MEAN, CLIP_STD), 4, max_length=64)


def captions(batch, tokenizer):
    """The labelled text of each row of a collated batch (here: the caption)."""
    return [tokenizer.decode([t for t in row.tolist() if t != IGNORE_INDEX]).strip() for row in batch.labels]


def run(dataset, tokenizer, epoch=0, start=0, workers=2):
    """The captions of each batch the DataLoader yields for ``epoch`` from batch ``start``."""
    dataset.set_epoch(epoch)
    dataset.start_at(start)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=Collator(tokenizer.pad_token_id))
    return [captions(batch, tokenizer) for batch in loader]


def ranks(shards, processor, world=2, workers=2, **kw):
    return [StreamingConversations(shards, processor, batch_size=3, seed=5, rank=r, world_size=world,
                                   num_workers=workers, shuffle_buffer=4, **kw) for r in range(world)]


def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path, processor, tokenizer):
    write_shards(tmp_path, [10, 10, 10, 10, 8])
    shards = webdataset_shards(f"{tmp_path}/{{000000..000004}}.tar", image_token="<image>")
    datasets = ranks(shards, processor)
    assert [len(d) for d in datasets] == [8, 8]  # 48 / (2 x 2) = 12 per worker = 4 batches of 3
    epochs = []
    for epoch in (0, 1):
        per_rank = [run(d, tokenizer, epoch) for d in datasets]
        assert [len(r) for r in per_rank] == [8, 8]
        seen = [c for r in per_rank for batch in r for c in batch]
        assert sorted(seen) == sorted(f"item {n}" for n in range(48))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new shard order and buffer shuffle each epoch
    again = [c for d in ranks(shards, processor) for batch in run(d, tokenizer, 0) for c in batch]
    assert again == epochs[0]  # fixed by the seed and the epoch


@pytest.mark.parametrize("start", [1, 3, 6])
def test_resumed_iteration_yields_exactly_the_rest_of_the_epoch(tmp_path, processor, tokenizer, start):
    write_shards(tmp_path, [9, 9, 9, 9])
    shards = webdataset_shards(f"{tmp_path}/{{000000..000003}}.tar", image_token="<image>")
    dataset = ranks(shards, processor)[1]
    whole = run(dataset, tokenizer, epoch=2)
    assert run(dataset, tokenizer, epoch=2, start=start) == whole[start:]
    positions = dataset.worker_positions(2, start)
    assert [p["slot"] for p in positions] == [2, 3]
    assert sum(p["batches"] for p in positions) == start


def test_uneven_count_wraps_round_like_a_distributed_sampler(tmp_path, processor, tokenizer):
    write_shards(tmp_path, [7, 6])  # 13 samples: 4 slots of 4, the last wrapping to the start
    shards = webdataset_shards(f"{tmp_path}/{{000000..000001}}.tar", image_token="<image>")
    seen = [c for d in ranks(shards, processor) for batch in run(d, tokenizer) for c in batch]
    assert len(seen) == 16 and set(seen) == {f"item {n}" for n in range(13)}


def test_in_memory_sources_mix_and_unreadable_images_are_counted_skips(tmp_path, processor, tokenizer, caplog):
    write_shards(tmp_path, [6], broken={"00002"})
    streamed = webdataset_shards(str(tmp_path / "000000.tar"), image_token="<image>")
    listed = list_shards([Sample(f"t{i}", [Turn("user", "hi"), Turn("assistant", f"text {i}")], [])
                          for i in range(6)], "data[1]:llava_json", size=4)
    assert [s.count for s in listed] == [4, 2]
    shards = limited(streamed, 5, 1) + limited(listed, None, 1)  # max_samples cuts the stream at 5
    dataset = StreamingConversations(shards, processor, batch_size=11, seed=0, num_workers=0)
    dataset.set_epoch(0)
    with caplog.at_level("WARNING"):
        (batch,) = list(DataLoader(dataset, batch_size=None, collate_fn=Collator(tokenizer.pad_token_id)))
    assert batch.skipped == 1 and "000000.tar#00002" in caplog.text
    assert sorted(captions(batch, tokenizer)) == sorted([f"item {n}" for n in (0, 1, 3, 4)] +
                                                        [f"text {i}" for i in range(6)])


def test_group_by_length_keeps_each_sample_once(tmp_path, processor, tokenizer):
    write_shards(tmp_path, [12, 12])
    shards = webdataset_shards(f"{tmp_path}/{{000000..000001}}.tar", image_token="<image>")
    datasets = ranks(shards, processor, group_by_length=True)
    seen = [c for d in datasets for batch in run(d, tokenizer) for c in batch]
    assert sorted(seen) == sorted(f"item {n}" for n in range(24))


def test_stage_shards_apply_max_samples_and_repeat_once_per_source(tmp_path):
    from omegaconf import OmegaConf

    from vlm.config import DataConfig

    write_shards(tmp_path / "wds", [4, 4])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(5)))
    entries = []
    for format, args, max_samples, repeat in (("webdataset", {"shards": f"{tmp_path}/wds/{{000000..000001}}.tar"}, 6, 2),
                                              ("jsonl", {"path": str(rows)}, 3, 3)):
        entry = OmegaConf.structured(DataConfig)
        entry.format, entry.args, entry.max_samples, entry.repeat = format, args, max_samples, repeat
        entries.append(entry)
    shards = stage_shards(entries, lambda d: read_samples([d], "<image>"), "<image>")
    assert sum(s.count for s in shards) == 6 * 2 + 3 * 3
    assert stage_shards(entries[1:], lambda d: read_samples([d], "<image>"), "<image>") is None  # map-style
