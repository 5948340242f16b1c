"""``report_to: jsonl``: metrics.jsonl, which the trainer's MetricsLog writes in every run."""

from __future__ import annotations

from vlm.training.trackers.base import Tracker


class JsonlTracker(Tracker):
    """``<stage>/metrics.jsonl``, one JSON record per log step (and ``OUT/metrics.json`` for the
    final evaluations). :class:`vlm.training.metrics_log.MetricsLog` is its one writer and runs in
    every stage, named or not, so there is no tracker run to build."""

    @classmethod
    def build(cls, options, ctx):
        return None

    def log(self, metrics, step):
        """Never called (``build`` returns None)."""
