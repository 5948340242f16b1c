"""A stalled process under ``torchrun`` (gloo): with ``collective_timeout_s`` the waiting rank stops
with one line naming its rank, the stage, the step and what it waited on, instead of torch's
30-minute default; the stalled rank stops too, naming the lost peer."""

from __future__ import annotations

import time

from conftest import run_config
from test_distributed import WORKER, launch, torchrun


def test_a_stalled_rank_stops_every_rank_with_one_line(tmp_path, tokenizer_dir, shapes_data):
    captions = {"format": "coco_captions",
                "args": {"path": shapes_data["train"]["captions"], "image_root": shapes_data["train"]["image_root"]}}
    run_config(tmp_path, tokenizer_dir, {
        "s": {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"}, "data": [captions],
              "batch_size": 2, "max_steps": 6, "log_every": 1, "warmup_ratio": 0.0, "collective_timeout_s": 3}})
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    start = time.monotonic()
    done = launch(torchrun(WORKER, "train", config, "s", str(tmp_path / "out"), "--sleep-after-step", "2", "1", "12"),
                  timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - start < 90  # not torch's 30-minute default
    # rank 1 stalls after step 2: rank 0 waits in its next collective (the preemption check that
    # ends step 2), times out, and stops; rank 1 wakes to a lost peer and stops too
    waited = [line for line in done.stderr.splitlines() if "rank 0: stage 's' step 2: the preemption check" in line]
    assert waited and "waited longer than collective_timeout_s=3 s" in waited[0], done.stderr[-3000:]
    lost = [line for line in done.stderr.splitlines() if "rank 1: stage 's' step" in line]
    assert lost and "lost another process" in lost[0], done.stderr[-3000:]
