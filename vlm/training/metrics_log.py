"""The one writer of ``metrics.jsonl`` (and ``loss.png``): a callback the trainer adds last.

The trainer's metrics log as a callback: every log record (the trainer's loss records and
whatever a callback logs through ``ctx.log``, such as evaluation scores) appended to
``<out_dir>/metrics.jsonl`` and, at the end, the loss curves plotted to ``<out_dir>/loss.png``
(rank 0 only). It is the one writer of ``metrics.jsonl``. The trainer adds it after the caller's
callbacks, so keys they add to a record are written too.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlm.training.callbacks import Callback


class MetricsLog(Callback):
    """Writes ``metrics.jsonl`` and ``loss.png`` under the stage's ``out_dir``. A fresh run
    starts the file anew; a resumed one keeps the records up to the restored step (dropping any
    a crashed run wrote past its checkpoint) and appends from there."""

    def on_train_start(self, ctx, position):
        if not ctx.is_main:
            return
        path = ctx.out_dir / "metrics.jsonl"
        if position["step"] == 0:
            path.unlink(missing_ok=True)
        elif path.is_file():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= position["step"]]
            path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, ctx, record):
        if ctx.is_main:
            with (ctx.out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_end(self, ctx, final):
        if ctx.is_main:
            plot_losses(ctx.out_dir / "metrics.jsonl", ctx.out_dir / "loss.png")


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Plot every ``loss*`` series of a metrics JSON-lines file against the step."""
    if not metrics_path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = sorted({k for r in records for k in r if k.startswith("loss")})
    evals = sorted({k for r in records for k in r if k.startswith("eval/")})
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(metrics_path.parent.name)
    if evals:  # evaluation during training, beside the loss
        panel = axes[0][1]
        for key in evals:
            points = [(r["step"], r[key]) for r in records if key in r]
            panel.plot(*zip(*points), marker="o", label=key[len("eval/"):])
        panel.set_xlabel("step")
        panel.set_ylabel("score")
        panel.legend(fontsize="small")
        panel.set_title("evaluation during training")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
