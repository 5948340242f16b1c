"""Training on streamed sources: a webdataset / HF streaming stage (mixed with a map-style reader)
trains, records its workers' stream positions in the checkpoint, and resumes mid-epoch to the
same weights and losses; 2 processes x 2 workers on gloo killed and resumed (slow)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file
from test_streaming import write_shards

import vlm.app.stages
import vlm.checkpoint.train_state
from vlm.core.errors import CheckpointError


def write_parquet(folder: Path, sizes, first: int = 1000) -> str:
    """Parquet files of ``sizes`` rows (an ``image`` and a ``caption``: ``item N``, N from ``first``)."""
    import datasets
    from test_streaming import png_bytes

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    n = first
    for index, size in enumerate(sizes):
        rows = {"image": [{"bytes": png_bytes(i % 250), "path": None} for i in range(n, n + size)],
                "caption": [f"item {i}" for i in range(n, n + size)]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{index:06d}.parquet"))
        n += size
    return str(folder)


def sources(root: Path, kind: str) -> list:
    if kind == "webdataset":
        write_shards(root / "wds", [5, 5, 5, 5])
        return [{"format": "webdataset", "args": {"shards": f"{root}/wds/{{000000..000003}}.tar"}}]
    return [{"format": "hf_dataset", "args": {"path": write_parquet(root / "hf", [6, 7, 7]), "streaming": True}}]


def stage(data, **extra) -> dict:
    return {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "full"}, "data": data,
                  "learning_rate": 3e-3, "batch_size": 3, "num_workers": 2, "shuffle_buffer": 4,
                  "max_steps": 6, "save_every": 3, "log_every": 1, "warmup_ratio": 0.0, **extra}}


def weights(final: Path) -> dict:
    return {**load_file(str(final / "connector.safetensors")), **{
        f"llm.{k}": v for k, v in load_file(str(final / "llm.safetensors")).items()}}


def metrics(folder: Path) -> list:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("kind", ["webdataset", "hf_dataset"])
def test_streaming_stage_resumes_mid_epoch_to_the_same_weights(tmp_path, tokenizer_dir, shapes_data, kind):
    train = shapes_data["train"]
    data = sources(tmp_path, kind) + [{"format": "coco_captions", "max_samples": 4,
                                       "args": {"path": train["captions"], "image_root": train["image_root"]}}]
    cfg = run_config(tmp_path, tokenizer_dir, stage(data), out_dir=tmp_path / "A")
    a = Path(vlm.app.stages.run_stage(cfg, "s")).parent
    # the stage ended mid-epoch: its DataLoader workers (which ignore SIGTERM) are shut down, not
    # left for the interpreter's exit to wait on
    assert multiprocessing.active_children() == []
    # 24 samples, 2 workers, batches of 3: 8 batches an epoch; step 3 is mid-epoch
    state = vlm.checkpoint.train_state.load_training_state(a / "checkpoints" / "step_0000003")
    assert state["position"]["epoch"] == 0 and state["position"]["batch"] == 3
    assert state["stream_workers"] == [[{"slot": 0, "epoch": 0, "batches": 2}, {"slot": 1, "epoch": 0, "batches": 1}]]

    cfg_b = run_config(tmp_path, tokenizer_dir, stage(data), out_dir=tmp_path / "B")
    b = tmp_path / "B" / "s"
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    final_b = vlm.app.stages.run_stage(cfg_b, "s", resume=True)
    wa, wb = weights(a / "final"), weights(final_b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["loss"] for r in metrics(b)] == [r["loss"] for r in metrics(a)][3:]
    start = weights(a / "checkpoints" / "step_0000003")
    assert any(not torch.equal(start[k], wa[k]) for k in start)  # the resumed steps moved the weights

    # another worker count cannot take these positions: refused, naming the layout
    cfg_c = run_config(tmp_path, tokenizer_dir, stage(data, num_workers=1), out_dir=tmp_path / "C")
    shutil.copytree(a / "checkpoints" / "step_0000003", tmp_path / "C" / "s" / "checkpoints" / "step_0000003")
    with pytest.raises(CheckpointError, match=r"1 process\(es\), 2 worker\(s\) each.*1 worker\(s\)"):
        vlm.app.stages.run_stage(cfg_c, "s", resume=True)


def seen(folder: Path, tokenizer, up_to: int = 10 ** 9) -> dict:
    """{(rank, step): [caption of each row]} from the worker's rank_rows files, steps <= ``up_to``."""
    out = {}
    for rank in (0, 1):
        for line in (folder / f"rank_rows_{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["step"] <= up_to:
                out[rank, record["step"]] = [tokenizer.decode(row).strip() for row in record["rows"]]
    return out


@pytest.mark.slow  # two torchrun launches of 2 processes x 2 workers (about 2-3 minutes on a shared CPU)
def test_two_ranks_two_workers_killed_mid_epoch_resume_bit_identical(tmp_path, tokenizer_dir, tokenizer):
    from test_distributed import WORKER, launch, torchrun

    write_shards(tmp_path / "wds", [5, 7])  # items 0..11 in tars, 1000..1011 in parquet files
    data = [{"format": "webdataset", "args": {"shards": f"{tmp_path}/wds/{{000000..000001}}.tar"}},
            {"format": "hf_dataset", "args": {"path": write_parquet(tmp_path / "hf", [4, 8]), "streaming": True}}]
    # 24 samples / (2 ranks x 2 workers) = 6 a worker, 3 batches of 2: 6 steps an epoch per rank
    run_config(tmp_path, tokenizer_dir, stage(data, batch_size=2, max_steps=9, save_every=3))
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    done = launch(torchrun(WORKER, "train", config, "s", str(tmp_path / "whole"),
                           "--then", str(tmp_path / "cut"), "--kill-after-step", "4"))
    assert done.returncode != 0 and (tmp_path / "whole" / "s" / "final").is_dir(), done.stderr[-3000:]
    cut = tmp_path / "cut" / "s"
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["step_0000003"] and not (cut / "final").exists()
    resumed = launch(torchrun(WORKER, "train", config, "s", str(tmp_path / "cut"), "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (cut / "rank_rows_0.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] + [4, 5, 6, 7, 8, 9]  # killed after step 4; resumed at step 3's checkpoint

    whole_w, cut_w = weights(tmp_path / "whole" / "s" / "final"), weights(cut / "final")
    assert whole_w.keys() == cut_w.keys() and all(torch.equal(whole_w[k], cut_w[k]) for k in whole_w)
    whole = seen(tmp_path / "whole" / "s", tokenizer)
    assert sorted(whole) == [(r, s) for r in (0, 1) for s in range(1, 10)]
    epoch0 = [c for (rank, step), rows in whole.items() if step <= 6 for c in rows]
    assert sorted(epoch0) == sorted([f"item {n}" for n in range(12)] + [f"item {n}" for n in range(1000, 1012)])
    # the killed run's steps up to its checkpoint, then the resumed run's: the same rows, step by step
    # (the resumed launch appended to the files of the killed one; later records win)
    assert seen(cut, tokenizer) == whole
    state = vlm.checkpoint.train_state.load_training_state(cut / "checkpoints" / "step_0000003")
    assert state["stream_workers"] == [[{"slot": 2 * r, "epoch": 0, "batches": 2},
                                        {"slot": 2 * r + 1, "epoch": 0, "batches": 1}] for r in (0, 1)]


@pytest.mark.parametrize("change,needle", [
    ({"stage": {"feature_cache": True}}, "feature_cache: not available for a streaming stage"),
    ({"model": {"vision": {"tiling": {"enabled": True}}}}, "AnyRes samples are not streamed yet"),
    ({"stage": {"objective": "dpo"}}, "objective dpo reads preference pairs"),
    ({"stage": {"data": [{"format": "webdataset"}, {"format": "jsonl", "max_visual_tokens": 64}]}},
     "data.1.max_visual_tokens: a dataset's own budget"),
])
def test_what_a_streaming_stage_cannot_take_is_refused_in_one_line(change, needle):
    from omegaconf import OmegaConf

    from vlm.config import ModelConfig, StageConfig
    from vlm.training.objectives import OBJECTIVES

    stage = OmegaConf.merge(OmegaConf.structured(StageConfig), change.get("stage", {}))
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), change.get("model", {}))
    assert vlm.app.stages.streaming_refusal(OmegaConf.structured(StageConfig), OmegaConf.structured(ModelConfig),
                                            OBJECTIVES.get("lm")) is None
    assert needle in vlm.app.stages.streaming_refusal(stage, model, OBJECTIVES.get(stage.objective))
