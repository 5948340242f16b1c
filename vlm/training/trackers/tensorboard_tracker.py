"""``report_to: tensorboard``: event files under ``<stage folder>/tensorboard/``."""

from __future__ import annotations

import json
from typing import Any, Dict

from vlm.training.trackers.base import Tracker, TrackerContext, flatten, require

FOLDER = "tensorboard"


class TensorBoardTracker(Tracker):
    """Scalars through ``torch.utils.tensorboard.SummaryWriter`` into ``<folder>/tensorboard``.
    A resumed run writes into the same folder with ``purge_step`` at its first new step, so
    TensorBoard hides what a crashed run logged past the checkpoint; the config goes in as
    hyperparameters (the HParams plugin) and as text."""

    package = "tensorboard"

    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        require("tensorboard", "report_to")
        from torch.utils.tensorboard import SummaryWriter

        purge = None if ctx.resume_step is None else ctx.resume_step + 1
        self.writer = SummaryWriter(log_dir=str(ctx.folder / FOLDER), purge_step=purge)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_config(self, config: Dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        flat = flatten(config)
        flat.update(run_name=self.ctx.display_name, run_id=self.ctx.run_id)
        for event in hparams(flat, {}):
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", global_step=0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str = "finished") -> None:
        self.writer.close()
