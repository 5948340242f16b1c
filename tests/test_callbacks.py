"""The trainer's callback seam: every hook is called at its point of the loop, in order."""

from __future__ import annotations

from pathlib import Path

import vlm.app.stages
from conftest import run_config
from vlm.training.callbacks import Callback


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, trainer, position):
        self.events.append(("start", position["step"]))

    def on_step_end(self, trainer, position):
        self.events.append(("step", position["step"]))

    def on_log(self, trainer, record):
        record["extra"] = 1.0  # a callback may add keys to the logged record
        self.events.append(("log", record["step"]))

    def on_checkpoint(self, trainer, folder):
        assert (folder / "training_state.pt").is_file()
        self.events.append(("checkpoint", folder.name))

    def on_train_end(self, trainer, final):
        assert (final / "manifest.json").is_file()
        self.events.append(("end", final.name))


def test_every_hook_is_called_in_order(tmp_path, tokenizer_dir, shapes_data):
    stages = {"s": {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
                    "data": [{"format": "coco_captions",
                              "args": {"path": shapes_data["train"]["captions"],
                                       "image_root": shapes_data["train"]["image_root"]},
                              "max_samples": 8}],
                    "batch_size": 4, "max_steps": 4, "log_every": 2, "save_every": 2}}
    cfg = run_config(tmp_path, tokenizer_dir, stages)
    recorder = Recorder()
    run = vlm.app.stages.build_stage(cfg, "s", callbacks=[recorder])
    run.trainer.train()
    assert recorder.events == [("start", 0), ("step", 1), ("log", 2), ("checkpoint", "step_0000002"),
                               ("step", 2), ("step", 3), ("log", 4), ("step", 4), ("end", "final")]
    assert all(r["extra"] == 1.0 for r in run.trainer.history)
    assert "extra" in (Path(cfg.out_dir) / "s" / "metrics.jsonl").read_text()
