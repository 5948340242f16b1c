"""The ``vlm`` command with a signal injected after a chosen step, for tests/test_preemption.py.

``python tests/preempt_worker.py ARGS...`` runs ``vlm ARGS...`` in this process (under torchrun
too). ``VLM_TEST_SIGNAL=NAME:STEP[:RANK]`` (e.g. ``SIGUSR1:3:1``): rank RANK (default: every rank)
sends itself signal NAME right after optimizer step STEP, on the first attempt only (when
torchrun's ``TORCHELASTIC_RESTART_COUNT`` is 0 or unset), so a restarted worker runs clean.
"""

from __future__ import annotations

import os
import signal
import sys

import vlm.app.stages
from vlm.training.callbacks import Callback


class SignalAfterStep(Callback):
    """Send this process ``signum`` once optimizer step ``step`` has finished."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_step_end(self, ctx, position):
        if position["step"] == self.step:
            os.kill(os.getpid(), self.signum)


def injected_callbacks() -> list:
    """The callbacks ``VLM_TEST_SIGNAL`` asks for in this process (none on a restart)."""
    spec = os.environ.get("VLM_TEST_SIGNAL")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return []
    name, step, *rank = spec.split(":")
    if rank and rank[0] != os.environ.get("RANK", "0"):
        return []
    return [SignalAfterStep(getattr(signal, name), int(step))]


def main() -> None:
    build_stage = vlm.app.stages.build_stage

    def with_signal(*args, callbacks=(), **kwargs):
        return build_stage(*args, callbacks=[*callbacks, *injected_callbacks()], **kwargs)

    vlm.app.stages.build_stage = with_signal  # the name run_stage calls
    from vlm.app.cli import main as vlm_main

    vlm_main(sys.argv[1:])


if __name__ == "__main__":
    main()
