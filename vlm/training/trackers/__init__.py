"""Experiment trackers by exact name (``report_to``): jsonl, tensorboard, wandb, mlflow.

Each entry follows :class:`vlm.core.registry.Component` and builds a
:class:`~vlm.training.trackers.base.Tracker` for one tracker run (a stage, or a run's final
evaluations) from a :class:`~vlm.training.trackers.base.TrackerContext`; a plug-in adds one with
``@TRACKERS.register("name")``. Listed lazily: naming ``tensorboard`` never imports wandb.
"""

from __future__ import annotations

from vlm.core.registry import Registry
from vlm.training.trackers.base import Tracker, TrackerContext

TRACKERS: Registry = Registry("tracker", lazy={
    "jsonl": "vlm.training.trackers.jsonl_tracker:JsonlTracker",
    "tensorboard": "vlm.training.trackers.tensorboard_tracker:TensorBoardTracker",
    "wandb": "vlm.training.trackers.wandb_tracker:WandbTracker",
    "mlflow": "vlm.training.trackers.mlflow_tracker:MlflowTracker",
})

__all__ = ["TRACKERS", "Tracker", "TrackerContext"]
