"""Experiment trackers (``report_to``): a stage's loss series read back from TensorBoard's event
files, the offline wandb run and the MLflow file store equals metrics.jsonl; a preempted and
resumed stage continues the same tracker runs; unknown or uninstalled trackers are refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import run_config, run_vlm
from preempt_worker import SignalAfterStep

import vlm.app.stages
from vlm.core.errors import ConfigError, TrainingPreempted
from vlm.training.tracking import STATE_FILE


def stages(shapes, **extra) -> dict:
    captions = {"format": "coco_captions",
                "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    return {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"}, "data": [captions],
                  "learning_rate": 2e-3, "batch_size": 4, "max_steps": 5, "save_every": 2, "log_every": 1,
                  "warmup_ratio": 0.0, **extra}}


def jsonl_losses(stage_dir: Path) -> dict:
    """``{step: loss}`` of the training records in metrics.jsonl (the last record of a step wins)."""
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def tensorboard_series(stage_dir: Path, tag: str = "train/loss") -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stage_dir / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def wandb_history(stage_dir: Path) -> dict:
    """``{run id: {step: train/loss}}`` read from every offline run file under ``stage_dir/wandb``."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    runs: dict = {}
    for path in sorted((stage_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        store = DataStore()
        store.open_for_scan(str(path))
        run_id, history = None, {}
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                if "train/loss" in row:
                    history[int(row["_step"])] = row["train/loss"]
        runs.setdefault(run_id, {}).update(history)
    return runs


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as the tracker sets it (mlflow_tracker.py)
    return MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())


def mlflow_history(run_dir: Path, run_id: str) -> dict:
    return {m.step: m.value for m in mlflow_client(run_dir).get_metric_history(run_id, "train/loss")}


def mlflow_run(run_dir: Path, run_id: str):
    return mlflow_client(run_dir).get_run(run_id)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


ALL = ["jsonl", "tensorboard", "wandb", "mlflow"]


def test_every_tracker_holds_the_loss_series_of_metrics_jsonl(tmp_path, tokenizer_dir, shapes_data, offline):
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data), overrides=[f"report_to={json.dumps(ALL)}"])
    vlm.app.stages.run_stage(cfg, "s")
    stage_dir = Path(cfg.out_dir) / "s"
    losses = jsonl_losses(stage_dir)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    assert tensorboard_series(stage_dir) == pytest.approx(losses)
    assert sorted(tensorboard_series(stage_dir, "train/tokens_per_s")) == [1, 2, 3, 4, 5]
    state = json.loads((stage_dir / STATE_FILE).read_text())
    assert wandb_history(stage_dir) == {state["run_id"]: pytest.approx(losses)}
    assert mlflow_history(Path(cfg.out_dir), state["trackers"]["mlflow"]["run_id"]) == pytest.approx(losses)


def test_a_resumed_stage_continues_the_same_tracker_runs(tmp_path, tokenizer_dir, shapes_data, offline):
    reference = run_config(tmp_path, tokenizer_dir, stages(shapes_data), out_dir=tmp_path / "ref")
    vlm.app.stages.run_stage(reference, "s")
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data), overrides=[f"report_to={json.dumps(ALL)}"])
    with pytest.raises(TrainingPreempted):
        vlm.app.stages.run_stage(cfg, "s", callbacks=[SignalAfterStep(signal.SIGTERM, 3)])
    stage_dir = Path(cfg.out_dir) / "s"
    first = json.loads((stage_dir / STATE_FILE).read_text())
    assert sorted(tensorboard_series(stage_dir)) == [1, 2, 3]
    assert mlflow_run(Path(cfg.out_dir), first["trackers"]["mlflow"]["run_id"]).info.status == "KILLED"
    vlm.app.stages.run_stage(cfg, "s", resume=True)  # from the checkpoint of step 2
    second = json.loads((stage_dir / STATE_FILE).read_text())
    assert second == first  # the same vlm run id and the same MLflow run
    losses = jsonl_losses(Path(reference.out_dir) / "s")
    assert tensorboard_series(stage_dir) == pytest.approx(losses)  # step 3 of the first attempt purged
    assert wandb_history(stage_dir) == {first["run_id"]: pytest.approx(losses)}
    assert mlflow_history(Path(cfg.out_dir), first["trackers"]["mlflow"]["run_id"]) == pytest.approx(losses)
    assert mlflow_run(Path(cfg.out_dir), first["trackers"]["mlflow"]["run_id"]).info.status == "FINISHED"


def test_vlm_eval_out_writes_metrics_json_and_sends_the_scores_to_the_trackers(tmp_path, monkeypatch, capsys,
                                                                            offline):
    fixture = Path(__file__).parent / "fixtures" / "old_run"  # a config and a trained final (test_old_run_folder)
    shutil.copytree(fixture, tmp_path / "old_run")
    monkeypatch.chdir(tmp_path / "old_run")
    out = tmp_path / "evaluated"
    code, stdout, err = run_vlm(["eval", "run/config.yaml", "--checkpoint", "run/instruct/final", "--out", out,
                                 "report_to=[jsonl,tensorboard,wandb,mlflow]"], capsys)
    assert code == 0, err[-3000:]
    printed = json.loads(stdout.strip().splitlines()[-1])
    written = json.loads((out / "metrics.json").read_text())
    assert written["vqa"] == printed["vqa"] and set(printed["vqa"]) >= {"accuracy", "accuracy_other"}
    assert written["checkpoint"] == "run/instruct/final" and written["timings_s"]["total"] > 0
    assert (out / "eval" / "vqa_results.json").is_file()
    expected = {f"eval/vqa/{key}": value for key, value in printed["vqa"].items()}
    for tag, value in expected.items():
        assert tensorboard_series(out / "eval", tag) == {0: pytest.approx(value)}, tag
    run_id = json.loads((out / "eval" / STATE_FILE).read_text())["trackers"]["mlflow"]["run_id"]
    run = mlflow_run(out, run_id)
    assert run.data.metrics == pytest.approx(expected) and run.info.status == "FINISHED"


def test_an_unknown_tracker_is_refused_naming_the_entry(tmp_path, tokenizer_dir, shapes_data):
    with pytest.raises(ConfigError, match=r"report_to\.1.*'tensorbord'"):
        run_config(tmp_path, tokenizer_dir, stages(shapes_data), overrides=['report_to=[jsonl,tensorbord]'])


def test_a_tracker_without_its_package_is_refused_naming_the_package(tmp_path, tokenizer_dir, shapes_data,
                                                                    monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"report_to\.0: the 'wandb' tracker needs the wandb package"):
        run_config(tmp_path, tokenizer_dir, stages(shapes_data), overrides=["report_to=[wandb]"])


@pytest.mark.slow  # a torchrun launch of two processes
def test_under_two_processes_only_the_main_process_logs_and_one_builds_the_token_cache(tmp_path, tokenizer_dir,
                                                                                     shapes_data):
    from test_distributed import launch, torchrun

    run_config(tmp_path, tokenizer_dir, stages(shapes_data, max_steps=3, save_every=0))
    config = str(sorted(tmp_path.glob("recipe_*.yaml"))[-1])
    out, cache = tmp_path / "two", tmp_path / "cache"
    done = launch(torchrun("-m", "vlm", "train", config, "--out", str(out), f"token_cache_dir={cache}",
                           "report_to=[jsonl,tensorboard,wandb,mlflow]"), WANDB_MODE="offline")
    assert done.returncode == 0, done.stderr[-3000:]
    stage_dir = out / "s"
    assert len(list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((stage_dir / "wandb").glob("offline-run-*"))) == 1
    assert len(mlflow_client(out).search_runs([e.experiment_id for e in mlflow_client(out).search_experiments()])) == 1
    assert tensorboard_series(stage_dir) == pytest.approx(jsonl_losses(stage_dir))
    assert done.stderr.count("tokenization built") == 1 and len(list(cache.rglob("*.npz"))) == 1
