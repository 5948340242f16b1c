"""Run an evaluation from its config: generate, write official result files, score them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from vlm.config import EvalConfig
from vlm.data.formats import read_dataset
from vlm.evaluation import distributed
from vlm.evaluation.tasks import TASKS

logger = logging.getLogger(__name__)


def run_eval(model, processor, cfg: EvalConfig, out_dir: str | Path, name: str = "eval") -> Dict[str, float]:
    """Evaluate ``model`` as ``cfg`` says: read the data (the task's format when
    ``cfg.data.format`` is unset, with the task's reader defaults), then run the task
    (``vlm.evaluation.tasks``), which writes ``{name}_results.json``; returns the scores.

    Under several processes, each rank generates for its share of the samples; rank 0 writes
    the files and scores them; every rank returns rank 0's scores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = TASKS.get(cfg.task)
    args = {**task.reader_defaults, **dict(cfg.data.args)}
    samples = read_dataset(cfg.data.format or task.data_format, image_token=processor.image_token, **args)
    if cfg.data.max_samples:
        samples = samples[: cfg.data.max_samples]
    scores = distributed.broadcast_from_main(task.run(model, processor, cfg, samples, out_dir, name))
    logger.info("%s: %s", name, scores)
    return scores
