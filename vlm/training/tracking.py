"""The trainer callback that sends a stage's records to the experiment trackers of ``report_to``.

A :class:`TrackerSession` is one tracker run per named tracker (a stage, or a run's final
evaluations), with vlm's run id kept in ``<folder>/tracking.json`` so that a resumed stage
continues the same tracker runs. :class:`TrackingCallback` opens it at the start of a stage on
the main process only (the others never build a tracker), sends the resolved config as
hyperparameters on a fresh start, every log record (loss and each objective term, the learning
rate per parameter group, grad norm, samples/s, real tokens/s, eval scores) as it is logged,
flushes after each checkpoint and closes at the end, or when the stage stops with an error
(``on_train_abort``). Keys are ``train/<record key>``, and the eval callback's ``eval/...`` keys
as they are.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from vlm.core.errors import TrainingPreempted
from vlm.training.callbacks import Callback
from vlm.training.trackers import TRACKERS, Tracker, TrackerContext

logger = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
NOT_METRICS = ("stage", "step")  # record keys that say where a record belongs, not what was measured


def metrics_of(record: Dict[str, Any]) -> Dict[str, float]:
    """A log record's numbers under their tracker keys (``train/...``, ``eval/...`` as is)."""
    metrics = {}
    for key, value in record.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metrics[key if key.startswith("eval/") else f"train/{key}"] = float(value)
    return metrics


@dataclass
class TrackingSettings:
    """What every tracker run of a config shares: the names of ``report_to``, the run folder,
    run name, project and the resolved config (sent as hyperparameters)."""

    names: Sequence[str]
    run_dir: Path
    run_name: str
    project: str
    config: Dict[str, Any]

    def active(self) -> bool:
        """Whether any named tracker builds a tracker run (``jsonl`` alone builds none)."""
        return any(name != "jsonl" for name in self.names)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


class TrackerSession:
    """The tracker runs of one stage (or of the final evaluations) under ``folder``."""

    def __init__(self, settings: TrackingSettings, folder: Path, stage: str, resume_step: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        state_path = self.folder / STATE_FILE
        stored: Dict[str, Any] = {}
        if resume_step and state_path.is_file():
            stored = json.loads(state_path.read_text())
        self.resumed = bool(stored)
        self.run_id = stored.get("run_id") or uuid.uuid4().hex[:16]
        self.trackers: Dict[str, Tracker] = {}
        for name in dict.fromkeys(settings.names):
            ctx = TrackerContext(folder=self.folder, run_dir=Path(settings.run_dir), stage=stage,
                                 run_name=settings.run_name, project=settings.project, run_id=self.run_id,
                                 resume_step=resume_step if self.resumed else None,
                                 stored=dict(stored.get("trackers", {}).get(name, {})))
            tracker = TRACKERS.get(name).build(None, ctx)
            if tracker is not None:
                self.trackers[name] = tracker
        _write_json(state_path, {"run_name": settings.run_name, "run_id": self.run_id, "stage": stage,
                                 "trackers": {n: t.state() for n, t in self.trackers.items()}})
        verb = "continues" if self.resumed else "starts"
        logger.info("stage %s %s tracker run %s (%s) in %s", stage, verb, self.run_id,
                    ", ".join(self.trackers) or "none", self.folder)
        if not self.resumed:
            for tracker in self.trackers.values():
                tracker.log_config(settings.config)

    def log(self, metrics: Dict[str, float], step: int) -> None:
        """``metrics`` at ``step``, to every tracker."""
        if metrics:
            for tracker in self.trackers.values():
                tracker.log(metrics, step)

    def flush(self) -> None:
        for tracker in self.trackers.values():
            tracker.flush()

    def close(self, status: str = "finished") -> None:
        """End every tracker run (each closed once)."""
        trackers, self.trackers = self.trackers, {}
        for tracker in trackers.values():
            tracker.close(status)


class TrackingCallback(Callback):
    """Sends the stage's records to the trackers of ``settings`` (main process only)."""

    def __init__(self, settings: TrackingSettings):
        self.settings = settings
        self.session: Optional[TrackerSession] = None

    def on_train_start(self, ctx, position):
        if ctx.is_main:
            self.session = TrackerSession(self.settings, ctx.out_dir, ctx.stage_name,
                                          resume_step=position["step"] or None)

    def on_log(self, ctx, record):
        if self.session is not None:
            self.session.log(metrics_of(record), int(record["step"]))

    def on_checkpoint(self, ctx, folder):
        if self.session is not None:
            self.session.flush()

    def on_train_end(self, ctx, final):
        self._close("finished")

    def on_train_abort(self, ctx, error):
        try:
            self._close("preempted" if isinstance(error, TrainingPreempted) else "failed")
        except Exception as exc:  # the stage's own error is the one to report
            logger.warning("stage %s: closing the tracker runs failed: %s", ctx.stage_name, exc)

    def _close(self, status: str) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close(status)


def log_evaluations(settings: TrackingSettings, metrics: Dict[str, Dict[str, float]], folder: Path,
                    step: int = 0) -> List[str]:
    """A run's final evaluations (``{eval: {metric: value}}``) as a fresh tracker run named
    ``<run name>/eval`` under ``folder``, keys ``eval/<name>/<metric>``; returns the trackers
    that got them. Call it on the main process only."""
    if not settings.active():
        return []
    flat = {f"eval/{name}/{key}": float(value) for name, scores in metrics.items()
            for key, value in scores.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    session = TrackerSession(settings, folder, "eval")
    names = list(session.trackers)
    try:
        session.log(flat, step)
    finally:
        session.close()
    return names
