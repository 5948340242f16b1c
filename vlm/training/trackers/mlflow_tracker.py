"""``report_to: mlflow``: an MLflow run in ``MLFLOW_TRACKING_URI``, else a local store under OUT."""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from vlm.training.trackers.base import Tracker, TrackerContext, flatten, require

STORE = "mlruns"
STATUS = {"finished": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


def tracking_uri(ctx: TrackerContext) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the file store ``<run dir>/mlruns`` (works offline
    with mlflow-skinny; its sqlite store needs the full mlflow package)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    # mlflow 3 keeps the file store in maintenance mode and refuses it unless this is set
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (ctx.run_dir / STORE).resolve().as_uri()


class MlflowTracker(Tracker):
    """One MLflow run per stage in the experiment ``tracking.project``, named
    ``<run name>/<stage>`` and tagged with the stage, run name and vlm's run id. Through
    ``MlflowClient`` (no global active run). A resumed stage logs into the MLflow run it
    stored (:meth:`state`); the config goes in as params."""

    package = "mlflow"

    def __init__(self, ctx: TrackerContext):
        super().__init__(ctx)
        require("mlflow", "report_to")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri(ctx))
        run_id = ctx.stored.get("run_id")
        if run_id is None:
            experiment = self.client.get_experiment_by_name(ctx.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(ctx.project))
            run = self.client.create_run(experiment_id, run_name=ctx.display_name, tags={
                "vlm.stage": ctx.stage, "vlm.run_name": ctx.run_name, "vlm.run_id": ctx.run_id})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_config(self, config: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # the store's limit per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def state(self) -> Dict[str, Any]:
        return {"run_id": self.run_id}

    def close(self, status: str = "finished") -> None:
        self.client.set_terminated(self.run_id, status=STATUS.get(status, "FINISHED"))
