"""A collective that times out or loses its peer: one error naming the rank, step and phase."""

from __future__ import annotations

from typing import Optional

from vlm.core.errors import TrainingError

# how torch's backends word a collective that waited too long or whose peer went away
_FAILURE_WORDS = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                  "broken pipe", "nccl communicator was aborted")


class StepPhases:
    """What the training loop is doing now (set before each part of a step that talks to the other
    processes), so that a failed collective can say what it waited on."""

    def __init__(self):
        self.current = "starting the stage"
        self.step_done = False  # the phase follows the step's optimizer update (logging, saving, ...)

    def __call__(self, phase: str, step_done: bool = False) -> None:
        self.current, self.step_done = phase, step_done


def collective_failure(exc: BaseException, rank: int, stage: str, step: int, phase: str,
                       timeout_s: Optional[float]) -> Optional[TrainingError]:
    """``exc`` as one TrainingError line when it is a collective that timed out or lost a peer
    (None otherwise: other errors pass through as they are)."""
    text = str(exc)
    if not any(word in text.lower() for word in _FAILURE_WORDS):
        return None
    cause = (f"waited longer than collective_timeout_s={timeout_s:g} s" if timeout_s and "time" in text.lower()
             else "lost another process")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
    return TrainingError(f"rank {rank}: stage '{stage}' step {step}: {phase} {cause} ({first}); "
                         "the other processes stop too: look for the rank that stopped first")
