"""``report_to: wandb``: a Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise."""

from __future__ import annotations

import os
from typing import Any, Dict

from vlm.training.trackers.base import Tracker, TrackerContext, require


class WandbTracker(Tracker):
    """A wandb run with vlm's run id as its id, ``<run name>/<stage>`` as its name, the run name
    as its group and the stage as its job type, written under ``<folder>/wandb/``. ``WANDB_MODE``
    unset means ``offline`` (nothing leaves the machine; ``wandb sync`` uploads later); set it to
    ``online`` to stream. A resumed stage opens the same id with ``resume="allow"``."""

    package = "wandb"

    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        wandb = require("wandb", "report_to")
        ctx.folder.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=ctx.project, id=ctx.run_id, name=ctx.display_name, group=ctx.run_name,
                              job_type=ctx.stage, dir=str(ctx.folder), mode=mode, resume="allow",
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_config(self, config: Dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def close(self, status: str = "finished") -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)
