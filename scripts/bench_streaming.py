"""Data-pipeline benchmark: a webdataset streamed vs the same samples map-style (samples/s, peak RSS).

``python scripts/bench_streaming.py --samples 20000 --out DIR [--mode stream|map|both] [--workers 2]``
writes ``--samples`` captioned 32 x 32 PNGs as tar shards of 1000 under DIR (once), then reads one
epoch through the DataLoader as a stage would (tokenise, decode, transform, collate; no model):
streamed (vlm.data.streaming) and/or map-style (every sample read into a list first,
vlm.data.dataset). Prints one JSON line per mode: samples/s and the peak resident memory of the
main process and of its DataLoader workers. Run each mode in its own process for a clean peak.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import tarfile
import time
from pathlib import Path

from PIL import Image
from torch.utils.data import DataLoader

from vlm.data.batch import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.formats import read_webdataset, webdataset_shards
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlm.data.processor import VLMProcessor
from vlm.data.streaming import StreamingConversations
from vlm.data.templates import build_template
from vlm.data.tokenizer_training import train_tokenizer

SHARD = 1000


def write(out: Path, samples: int) -> str:
    """Tar shards of ``samples`` samples under ``out`` (kept when already there); their pattern."""
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (16 * i, 255 - 16 * i, 128)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    shards = -(-samples // SHARD)
    for s in range(shards):
        path = out / f"{s:06d}.tar"
        if path.exists():
            continue
        with tarfile.open(path, "w") as tar:
            for n in range(s * SHARD, min(samples, (s + 1) * SHARD)):
                for name, data in ((f"{n:09d}.png", images[n % 16]),
                                   (f"{n:09d}.txt", f"a shape number {n} in the image".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{out}/{{000000..{shards - 1:06d}}}.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["stream", "map", "both"], default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    pattern = write(Path(args.out) / f"wds_{args.samples}", args.samples)
    tokenizer = train_tokenizer(["a shape number in the image 0123456789"], vocab_size=300)
    processor = VLMProcessor(tokenizer, build_template("plain", tokenizer, None),
                             build_transform("resize", 32, CLIP_MEAN, CLIP_STD), 4, max_length=64)
    collate = Collator(tokenizer.pad_token_id)
    for mode in (["stream", "map"] if args.mode == "both" else [args.mode]):
        start = time.perf_counter()
        if mode == "stream":
            dataset = StreamingConversations(webdataset_shards(pattern, image_token="<image>"), processor,
                                             batch_size=args.batch_size, seed=0, num_workers=args.workers)
            dataset.set_epoch(0)
            loader = DataLoader(dataset, batch_size=None, num_workers=args.workers, collate_fn=collate)
        else:
            from vlm.data.types import marking_images_with

            with marking_images_with("<image>"):
                samples = read_webdataset(pattern)
            dataset = ConversationDataset(samples, processor, progress=False)
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                collate_fn=collate)
        seen = sum(batch.input_ids.shape[0] for batch in loader)
        seconds = time.perf_counter() - start
        print(json.dumps({"mode": mode, "samples": seen, "seconds": round(seconds, 1),
                          "samples_per_s": round(seen / seconds, 1),
                          "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                                                       1)}), flush=True)


if __name__ == "__main__":
    main()
