"""The plugin route: a component defined outside the vlm package (tests/plugins/) registers on
import, named by a run config's ``plugins:`` list or by a ``vlm.plugins`` entry point, and trains."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_config

import vlm.core.registry
from vlm.app.stages import build_stage
from vlm.config import ConfigError
from vlm.training.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"


class ConnectorSnapshots(Callback):
    """Keeps the connector's weights at the start and at the end of training."""

    def on_train_start(self, ctx, position):
        self.start = {k: v.detach().clone() for k, v in ctx.model().connector.state_dict().items()}

    def on_train_end(self, ctx, final):
        self.end = {k: v.detach().clone() for k, v in ctx.model().connector.state_dict().items()}


def stages(shapes):
    data = {"format": "coco_captions",
            "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]},
            "max_samples": 8}
    return {"align": {"data": [data], "batch_size": 4, "max_steps": 3, "learning_rate": 1e-2,
                      "warmup_ratio": 0.0, "log_every": 1}}


def test_a_connector_from_a_plugin_module_trains(tmp_path, tokenizer_dir, shapes_data, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    model = {"connector": {"name": "gated_linear", "options": {"gate_init": 0.5}}}
    with pytest.raises(ConfigError, match="model.connector.name: unknown connector 'gated_linear'"):
        run_config(tmp_path, tokenizer_dir, stages(shapes_data), model=model)
    cfg = run_config(tmp_path, tokenizer_dir, stages(shapes_data), model=model, overrides=["plugins=[my_connector]"])
    snapshots = ConnectorSnapshots()
    run = build_stage(cfg, "align", callbacks=[snapshots])
    assert type(run.trainer._unwrapped().connector).__module__ == "my_connector"
    run.trainer.train()
    losses = [r["loss"] for r in run.trainer.history]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert snapshots.start.keys() == snapshots.end.keys() == {"proj.weight", "proj.bias", "gate"}
    for key in snapshots.start:
        assert not torch.equal(snapshots.start[key], snapshots.end[key]), key
    assert snapshots.start["gate"].item() == 0.5

    # the stage output records its plugins: another process rebuilds the model from it alone
    final = Path(cfg.out_dir) / "align" / "final"
    assert json.loads((final / "plugins.json").read_text()) == ["my_connector"]
    code = ("import sys; from vlm.checkpoint.pretrained import load_pretrained; "
            f"model, _, _ = load_pretrained({str(final)!r}, device='cpu'); "
            "print(type(model.connector).__name__, round(float(model.connector.gate), 6))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(PLUGINS)])}
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "VLM_PLUGINS=my_connector" in refused.stderr  # a checkpoint names, the user allows
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "VLM_PLUGINS": "my_connector"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["GatedLinearConnector", str(round(float(snapshots.end["gate"]), 6))]


def test_plugin_options_are_checked_and_a_missing_module_is_named(tmp_path, tokenizer_dir, shapes_data,
                                                                  monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    model = {"connector": {"name": "gated_linear", "options": {"gate_int": 0.5}}}
    with pytest.raises(ConfigError, match=r"model.connector.options.gate_int.*did you mean 'gate_init'"):
        run_config(tmp_path, tokenizer_dir, stages(shapes_data), model=model, overrides=["plugins=[my_connector]"])
    with pytest.raises(ConfigError, match=r"plugins.0: cannot import plugin module 'no_such_plugin_mod'"):
        run_config(tmp_path, tokenizer_dir, stages(shapes_data), overrides=["plugins=[no_such_plugin_mod]"])


def test_an_entry_point_registers_on_the_first_unknown_name(monkeypatch):
    from importlib import metadata

    from vlm.modeling.connectors import CONNECTORS

    monkeypatch.syspath_prepend(str(PLUGINS))
    monkeypatch.delitem(sys.modules, "my_connector", raising=False)
    if "gated_linear" in CONNECTORS:  # registered by an earlier test in this process
        monkeypatch.delitem(CONNECTORS._entries, "gated_linear")
    point = metadata.EntryPoint(name="example", value="my_connector", group=vlm.core.registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group: [point] if group == vlm.core.registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(vlm.core.registry, "_entry_points_loaded", False)
    assert CONNECTORS.get("gated_linear").__name__ == "GatedLinearConnector"
