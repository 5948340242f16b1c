"""Preemption: SIGTERM / SIGUSR1 while a stage trains stop it at a step boundary, checkpointed.

The trainer installs :class:`PreemptionSignals` while a stage trains (the previous handlers come
back afterwards). A handler only notes the signal; after each optimizer step the trainer asks
:meth:`PreemptionSignals.requested`, which under several processes is one all-reduce (MAX) of a
0/1 flag, so every rank stops after the same step, writes the checkpoint of that step boundary
together and raises :class:`~vlm.core.errors.TrainingPreempted`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Dict, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

# SIGTERM: what schedulers (SLURM, Kubernetes) and torchrun's agent send first; SIGUSR1: what
# `sbatch --signal=USR1@N` sends ahead of the time limit
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class PreemptionSignals:
    """The preemption signals this process received while :meth:`installed` was active."""

    def __init__(self):
        self.received: Optional[int] = None
        self._noticed = False

    def _handle(self, signum, frame) -> None:
        # only a flag: a second signal while the checkpoint is written changes nothing (the write
        # is atomic), and logging here could deadlock on the logging lock
        if self.received is None:
            self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator["PreemptionSignals"]:
        """Catch SIGTERM and SIGUSR1 in this block; the previous handlers are restored after it.
        Outside the main thread (where Python cannot set handlers) nothing is installed."""
        self.received, self._noticed = None, False
        previous: Dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous[sig] = signal.signal(sig, self._handle)
        else:
            logger.info("training outside the main thread: SIGTERM / SIGUSR1 keep their handlers")
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                # None: the handler was not set from Python; the default is the closest there is
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def requested(self, accelerator) -> bool:
        """Whether this process, or with several processes any of them, received a signal. A
        collective when distributed: every process calls it at the same step boundary."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                box = torch.tensor([int(flag)], dtype=torch.int32, device=accelerator.device)
                dist.all_reduce(box, op=dist.ReduceOp.MAX)
                flag = bool(box.item())
        if flag and not self._noticed:
            self._noticed = True
            name = signal.Signals(self.received).name if self.received is not None else "a signal on another process"
            logger.warning("%s received: stopping after this step with a checkpoint", name)
        return flag


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGTERM / SIGUSR1 sent to the whole process
    group, so the main process finishes its step (workers exit when it does)."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
