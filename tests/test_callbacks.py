"""The trainer's callback seam: every hook is called at its point of the loop, in order, with
a narrow :class:`TrainingContext` (never the trainer); records logged through it pass every
callback's ``on_log`` and are written once to ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_config

import vlm.app.stages
from vlm.modeling.vlm import VisionLanguageModel
from vlm.training.callbacks import Callback, TrainingContext
from vlm.training.eval_callback import EvalDuringTraining
from vlm.training.trainer import Trainer


class Recorder(Callback):
    def __init__(self):
        self.events = []
        self.contexts = []

    def seen(self, ctx):
        assert isinstance(ctx, TrainingContext) and not isinstance(ctx, Trainer)
        self.contexts.append(ctx)

    def on_train_start(self, ctx, position):
        self.seen(ctx)
        assert ctx.step == position["step"]
        self.events.append(("start", position["step"]))

    def on_step_end(self, ctx, position):
        self.seen(ctx)
        assert ctx.step == position["step"]
        self.events.append(("step", position["step"]))

    def on_log(self, ctx, record):
        self.seen(ctx)
        record["extra"] = 1.0  # a callback may add keys to the logged record
        self.events.append(("eval" if any(k.startswith("eval/") for k in record) else "log", record["step"]))

    def on_checkpoint(self, ctx, folder):
        self.seen(ctx)
        assert (folder / "training_state.pt").is_file()
        self.events.append(("checkpoint", folder.name))

    def on_train_end(self, ctx, final):
        self.seen(ctx)
        assert (final / "manifest.json").is_file()
        self.events.append(("end", final.name))


def _stages(shapes_data, **extra):
    return {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                  "data": [{"format": "coco_captions",
                            "args": {"path": shapes_data["train"]["captions"],
                                     "image_root": shapes_data["train"]["image_root"]},
                            "max_samples": 8}],
                  "batch_size": 4, "max_steps": 4, "log_every": 2, **extra}}


def test_every_hook_is_called_in_order(tmp_path, tokenizer_dir, shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, _stages(shapes_data, save_every=2))
    recorder = Recorder()
    run = vlm.app.stages.build_stage(cfg, "s", callbacks=[recorder])
    run.trainer.train()
    assert recorder.events == [("start", 0), ("step", 1), ("log", 2), ("checkpoint", "step_0000002"),
                               ("step", 2), ("step", 3), ("log", 4), ("step", 4), ("end", "final")]
    assert all(r["extra"] == 1.0 for r in run.trainer.history)
    assert "extra" in (Path(cfg.out_dir) / "s" / "metrics.jsonl").read_text()


def test_callbacks_get_one_narrow_context_not_the_trainer(tmp_path, tokenizer_dir, shapes_data):
    cfg = run_config(tmp_path, tokenizer_dir, _stages(shapes_data))
    recorder = Recorder()
    run = vlm.app.stages.build_stage(cfg, "s", callbacks=[recorder])
    run.trainer.train()
    ctx = recorder.contexts[0]
    assert all(c is ctx for c in recorder.contexts)  # built once, passed to every hook
    assert (ctx.stage_name, ctx.step, ctx.total_steps, ctx.steps_per_epoch) == ("s", 4, 4, 2)
    assert ctx.out_dir == Path(cfg.out_dir) / "s"
    assert ctx.is_main and ctx.num_processes == 1 and isinstance(ctx.progress, dict)
    assert isinstance(ctx.model(), VisionLanguageModel)
    assert ctx.broadcast({"a": 1}) == {"a": 1}
    for private in ("accelerator", "history", "stage", "save_checkpoint", "optimizer", "callbacks"):
        assert not hasattr(ctx, private), private


def test_an_eval_record_passes_every_on_log_and_is_written_once(tmp_path, tokenizer_dir, shapes_data):
    scores = iter([1.0, 2.0])
    modes = []

    def evaluate(model):
        assert isinstance(model, VisionLanguageModel) and not model.training
        return {"fake/score": next(scores)}

    class Modes(Callback):
        def on_step_end(self, ctx, position):
            modes.append(ctx.model().connector.training)  # back in the stage's train mode

    cfg = run_config(tmp_path, tokenizer_dir, _stages(shapes_data))
    recorder = Recorder()
    evals = EvalDuringTraining(evaluate, every=2, keep_best="fake/score")
    run = vlm.app.stages.build_stage(cfg, "s", callbacks=[recorder, evals, Modes()])
    run.trainer.train()
    assert recorder.events == [("start", 0), ("step", 1), ("log", 2), ("step", 2), ("eval", 2),
                               ("step", 3), ("log", 4), ("step", 4), ("eval", 4), ("end", "final")]
    assert modes == [True] * 4
    out = Path(cfg.out_dir) / "s"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    written = [r for r in records if "eval/fake/score" in r]
    assert written == [{"stage": "s", "step": 2, "epoch": 1.0, "eval/fake/score": 1.0, "extra": 1.0},
                       {"stage": "s", "step": 4, "epoch": 2.0, "eval/fake/score": 2.0, "extra": 1.0}]
    assert [r for r in run.trainer.history if "eval/fake/score" in r] == written
    assert [r["step"] for r in records] == [2, 2, 4, 4]
    assert recorder.contexts[0].progress == {"fake/score": "2"}
    assert json.loads((out / "best.json").read_text()) == {"metric": "fake/score", "value": 2.0, "step": 4}
    assert (out / "best" / "manifest.json").is_file()  # ctx.save wrote the model
