"""Run one stage in a subprocess and optionally die by SIGKILL at a chosen point (for the
fault tests): ``python kill_run.py RECIPE OUT MODE [N] [--reference REF_OUT]``.

MODE ``full``: train to the end; ``step N``: SIGKILL right after optimizer step N;
``write N``: SIGKILL inside the N-th checkpoint write (after the weights, before the training
state); ``resume``: continue OUT from its latest checkpoint. ``--reference REF_OUT`` first trains
an uninterrupted run into REF_OUT in the same process (one interpreter start for both).
"""

from __future__ import annotations

import argparse
import os
import signal

import vlm.app.stages
import vlm.training.trainer
from vlm.app.wiring import load_run_config as load_config
from vlm.training.callbacks import Callback


class KillAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, ctx, position):
        if position["step"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def train(recipe: str, out: str, resume: bool = False, callbacks=()) -> None:
    cfg = load_config(recipe, [f"out_dir={out}"])
    vlm.app.stages.build_stage(cfg, "align", callbacks=callbacks).trainer.train(resume=resume)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("mode", choices=["full", "step", "write", "resume"])
    parser.add_argument("n", type=int, nargs="?", default=0)
    parser.add_argument("--reference")
    args = parser.parse_args()
    if args.reference:
        train(args.recipe, args.reference)
    if args.mode == "step":
        train(args.recipe, args.out, callbacks=[KillAfterStep(args.n)])
    elif args.mode == "write":
        calls = {"n": 0}
        original = vlm.training.trainer.save_training_state

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == args.n:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*a, **k)

        vlm.training.trainer.save_training_state = dying  # the name the trainer calls
        train(args.recipe, args.out)
    else:
        train(args.recipe, args.out, resume=args.mode == "resume")


if __name__ == "__main__":
    main()
