"""The accelerate-based training loop for one stage.

It runs on one CPU, one GPU, or many processes launched by ``torchrun`` or ``accelerate launch``;
how the stage is spread over them (DDP, FSDP2, DeepSpeed ZeRO) is the stage's ``strategy``
(:mod:`vlm.training.strategies`). Gradient accumulation, clipping, warmup + cosine schedule,
bf16 / fp16 autocast, tqdm progress with loss / lr / samples/s, atomic checkpoints (the
``keep_last`` newest kept), a non-finite guard, exact resume and preemption (SIGTERM / SIGUSR1:
a checkpoint at the step boundary, then :class:`~vlm.core.errors.TrainingPreempted`) live here;
the JSON-lines metrics and the loss-curve PNG are written by a callback
(``vlm.training.metrics_log.MetricsLog``), the seam everything else plugs into too.
Callbacks never see the trainer: it builds one :class:`~vlm.training.callbacks.TrainingContext`
(the stage's name and step counts, ``out_dir``, the unwrapped model, ``log`` / ``save`` /
``broadcast``, progress-bar fields) and passes it to every hook.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import broadcast_object_list
from torch.utils.data import DataLoader, IterableDataset, Sampler
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vlm.checkpoint.components import load_trained_state, trained_state
from vlm.checkpoint.fsio import atomic_dir
from vlm.checkpoint.train_state import (
    DataPosition,
    PerRank,
    RNGStates,
    Stateful,
    StateFunctions,
    collect_training_state,
    latest_checkpoint,
    prune_checkpoints,
    restore_training_state,
    save_training_state,
)
from vlm.config import TrainerSettings
from vlm.core.errors import (
    CheckpointError,
    DataFormatError,
    TrainingError,
    TrainingPreempted,
)
from vlm.data.samplers import EpochShuffleSampler  # noqa: F401  (re-exported)
from vlm.modeling.attention import use_training_attention
from vlm.modeling.weights import check_finite_weights
from vlm.training.callbacks import Callback, CallbackList, TrainingContext
from vlm.training.collectives import StepPhases, collective_failure
from vlm.training.compile import compile_repeated_blocks, eager, restore_eager
from vlm.training.frozen_weights import FrozenWeightCast
from vlm.training.metrics_log import MetricsLog
from vlm.training.nonfinite import NonFiniteGuard
from vlm.training.objectives.base import Objective
from vlm.training.objectives.lm import LanguageModeling
from vlm.training.preemption import PreemptionSignals, ignore_preemption_signals
from vlm.training.skips import SkipCounter
from vlm.training.stages import parameter_groups, set_train_modes
from vlm.training.strategies import Strategy, split_module_state

logger = logging.getLogger(__name__)


class TrainingModule(torch.nn.Module):
    """The model and the objective as one module, so that one DDP / FSDP wrapper sees every
    parameter and every forward goes through it."""

    def __init__(self, model, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective(self.model, batch)


class Trainer:
    """Trains ``model`` on ``dataset`` as ``settings`` (the trainer's part of the stage) say,
    spread over processes by ``strategy``, writing under ``out_dir``.

    ``save_state(model, folder)`` writes the model part of a checkpoint (weights, manifest,
    tokenizer); the trainer adds the training state and makes the write atomic. ``callbacks``
    (:mod:`vlm.training.callbacks`) are called at the start, after each step, on each log
    record, after each checkpoint and at the end, each with the trainer's ``context`` (a
    :class:`~vlm.training.callbacks.TrainingContext`), not the trainer.
    """

    def __init__(self, model, dataset, *, collate: Callable, settings: TrainerSettings, strategy: Strategy,
                 out_dir: str | Path, save_state: Callable, accelerator: Optional[Accelerator] = None,
                 stage_name: str = "stage", objective: Optional[Objective] = None,
                 callbacks: Sequence[Callback] = (), sampler: Optional[Sampler] = None):
        self.settings = settings
        schedule, optimization = settings.schedule, settings.optimization
        self.strategy = strategy
        # the metrics log comes last: it writes the keys the caller's callbacks add to a record
        self.callbacks = CallbackList([*callbacks, MetricsLog()])
        self.stage_name = stage_name
        self.out_dir = Path(out_dir)
        self.save_state = save_state
        self.accelerator = accelerator or self.strategy.make_accelerator()
        self.dataset = dataset
        if len(dataset) == 0:
            raise DataFormatError(f"stage '{stage_name}': no trainable samples")
        # a streaming dataset (vlm.data.streaming) yields this rank's batches itself, in an order
        # that depends only on the seed and the epoch, and resumes by itself (start_at)
        self.streaming = isinstance(dataset, IterableDataset)
        # any sampler with set_epoch whose order depends only on the seed and the epoch
        self.sampler = None if self.streaming else (
            sampler if sampler is not None else EpochShuffleSampler(len(dataset), schedule.seed))
        # the loader's own generator: creating an iterator must not draw from the global torch
        # RNG, or a resumed run (which creates one mid-epoch) shifts every dropout mask after it
        loader = DataLoader(dataset, batch_size=None if self.streaming else schedule.batch_size,
                            sampler=self.sampler, collate_fn=collate, num_workers=settings.num_workers,
                            drop_last=False, generator=torch.Generator().manual_seed(schedule.seed),
                            worker_init_fn=ignore_preemption_signals if settings.num_workers else None)
        objective = objective if objective is not None else LanguageModeling(model, None)
        if settings.training_attention:  # sdpa with an fp32 kernel under CPU autocast (faster backward)
            use_training_attention(model)
        module = TrainingModule(model, objective)

        def make_optimizer():  # after wrapping: a sharding strategy replaces the parameters
            groups = parameter_groups(module.model, optimization)
            extra = [p for p in module.objective.parameters() if p.requires_grad]
            if extra:  # an objective's own head learns at the vision rate (it reads vision features)
                groups.append({"params": extra, "lr": optimization.lr("vision"),
                               "weight_decay": optimization.weight_decay, "name": "objective"})
            return torch.optim.AdamW(groups, betas=(0.9, 0.999))

        self.model, self.optimizer, prepared = self.strategy.prepare(self.accelerator, module, make_optimizer,
                                                                     None if self.streaming else loader)
        self.loader = OnDevice(loader, self.accelerator.device) if self.streaming else prepared
        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / schedule.grad_accum)
        self.total_steps = schedule.max_steps or max(1, math.ceil(self.steps_per_epoch * schedule.epochs))
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(schedule.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps, min_lr_rate=schedule.min_lr_ratio,
        )
        self.history: List[dict] = []
        self.data = DataPosition()
        self.preemption = PreemptionSignals()
        self._gathered_objective: Optional[dict] = None  # set while a sharded save runs
        # a checkpoint's training state, one stateful per part (vlm.checkpoint.train_state)
        self.training_state: Dict[str, Stateful] = {
            "optimizer": StateFunctions(
                lambda: self.strategy.optimizer_state(self.accelerator, self.model, self.optimizer),
                lambda state: self.strategy.load_optimizer_state(self.model, self.optimizer, state)),
            "scheduler": self.scheduler,
            "rng_per_rank": RNGStates(self.accelerator.process_index),
            "position": self.data,
            "objective": StateFunctions(self._objective_state, self._load_objective_state),
        }
        if self.streaming:  # each rank's workers' positions in the stream (checked on resume)
            self.training_state["stream_workers"] = PerRank(
                lambda: dataset.worker_positions(self.data.position["epoch"], self.data.position["batch"]),
                self._check_stream_workers)
        # what runs between training steps (callbacks, checkpoints): eager, fp32 frozen weights
        self._outside_steps = contextlib.nullcontext
        # what the callbacks see of the stage (they never get the trainer itself)
        self.context = TrainingContext(
            stage_name=stage_name, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            out_dir=self.out_dir, is_main=self.is_main, num_processes=self.accelerator.num_processes,
            model=self._unwrapped, log=self._log, save=lambda folder: self.save_checkpoint(folder, with_training_state=False),
            broadcast=self._broadcast, train_mode=lambda: set_train_modes(self._unwrapped(), settings.trains.modes))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _unwrapped(self):
        return self.strategy.unwrap(self.accelerator, self.model).model

    def _log(self, record: dict) -> None:
        """A metrics record through every callback's ``on_log`` (the metrics log writes it), then
        into ``history``."""
        self.callbacks.on_log(self.context, record)
        self.history.append(record)

    def _broadcast(self, value):
        """``value`` of the main process, on every process."""
        if self.accelerator.num_processes == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def save_checkpoint(self, folder: Path, with_training_state: bool) -> None:
        """Atomically write the model state (and, when asked, the training state: every stateful
        of ``training_state``). Every process takes part: a sharding strategy gathers the state
        first, and some statefuls are collectives."""
        acc = self.accelerator
        acc.wait_for_everyone()
        gathered = self.strategy.gathered_state(acc, self.model)
        model_state = None
        if gathered is not None:
            model_state, self._gathered_objective = split_module_state(gathered)
        try:
            collected = collect_training_state(self.training_state) if with_training_state else None
        finally:
            self._gathered_objective = None
        where = f"stage '{self.stage_name}', not saving {folder}"
        if model_state is not None:
            check_finite_weights(model_state, where, TrainingError)
        elif gathered is None:
            check_finite_weights(self._unwrapped(), where, TrainingError)
        if self.is_main:
            with atomic_dir(folder) as tmp:
                if model_state is None:
                    self.save_state(self._unwrapped(), tmp)
                else:
                    self.save_state(self._unwrapped(), tmp, state=model_state)
                if collected is not None:
                    save_training_state(tmp, collected)
        acc.wait_for_everyone()

    def _objective_state(self) -> dict:
        """The objective's own parameters: from the state a sharding strategy gathered for this
        save, else from the live module."""
        if self._gathered_objective is not None:
            return self._gathered_objective
        return self.strategy.unwrap(self.accelerator, self.model).objective.state_dict()

    def _load_objective_state(self, state: dict) -> None:
        objective_state = {f"objective.{k}": v for k, v in state.items()}
        if not self.strategy.load_module_state(self.model, objective_state):
            self.strategy.unwrap(self.accelerator, self.model).objective.load_state_dict(state)

    def _restore(self, folder: Path) -> None:
        """Resume from a checkpoint of this stage: the weights it trained, then every stateful."""
        modes = self.settings.trains.modes
        module_state = {f"model.{k}": v for k, v in trained_state(self._unwrapped(), folder, modes).items()}
        if not self.strategy.load_module_state(self.model, module_state):
            load_trained_state(self._unwrapped(), folder, modes)
        restore_training_state(folder, self.training_state)
        logger.info("resumed from %s at step %d", folder, self.data.position["step"])

    def _check_stream_workers(self, saved: List[List[dict]]) -> None:
        """The stream positions a checkpoint recorded must be this run's layout (ranks, workers)
        at the restored data position."""
        position = self.data.position
        own = self.dataset.worker_positions(position["epoch"], position["batch"])
        rank = self.accelerator.process_index
        if len(saved) != self.accelerator.num_processes or saved[rank] != own:
            raise CheckpointError(
                f"stage '{self.stage_name}': the checkpoint's stream positions ({len(saved)} process(es), "
                f"{len(saved[min(rank, len(saved) - 1)])} worker(s) each) are not this run's "
                f"({self.accelerator.num_processes} process(es), {len(own)} worker(s)); resume with the "
                "same number of processes and num_workers")

    def _batches(self, start_epoch: int, start_batch: int):
        """(epoch, batch index, batch) from a data position onwards, forever."""
        epoch, skip = start_epoch, start_batch
        while self.streaming:
            self.dataset.set_epoch(epoch)
            self.dataset.start_at(skip)
            for index, batch in enumerate(self.loader, start=skip):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0
        while True:
            # accelerate's loader sets the sampler's epoch from its own pass counter when iterated,
            # which starts at 0 after a resume: set both to the data position's epoch
            self.sampler.set_epoch(epoch)
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            loader = skip_first_batches(self.loader, skip) if skip else self.loader
            for index, batch in enumerate(loader, start=skip):
                yield epoch, index, batch
            epoch, skip = epoch + 1, 0

    def train(self, resume: bool = False) -> Path:
        """Run the stage to ``total_steps``; returns the ``final`` output folder. With
        ``compile`` on, the model's repeated blocks are compiled for the training steps
        (vlm.training.compile); with ``frozen_weight_cast`` on, under bf16 / fp16 the frozen
        linear weights are cast once, not every step. Callbacks and checkpoints see the eager
        fp32 model. SIGTERM / SIGUSR1 meanwhile end the stage after the current step with a
        checkpoint of it and raise TrainingPreempted (vlm.training.preemption)."""
        casts = self._frozen_weight_cast()
        blocks = compile_repeated_blocks(self._unwrapped()) if self.settings.compile else []

        @contextlib.contextmanager
        def outside_steps():
            with eager() if blocks else contextlib.nullcontext(), \
                    casts.full_precision() if casts else contextlib.nullcontext():
                yield

        self._outside_steps = outside_steps
        try:
            if casts:
                casts.to_low()
            with self.preemption.installed():
                return self._train(resume)
        except BaseException as error:  # the callbacks release what they hold (trackers), then it goes on
            with self._outside_steps():
                self.callbacks.on_train_abort(self.context, error)
            raise
        finally:
            restore_eager(blocks)
            if casts:
                casts.to_full()
            self._outside_steps = contextlib.nullcontext

    def _frozen_weight_cast(self) -> Optional[FrozenWeightCast]:
        """Frozen weights pre-cast to the autocast dtype (vlm.training.frozen_weights), for a
        bf16 / fp16 stage whose parameters this process holds whole (not sharded)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.settings.precision.value)
        if dtype is None or not self.settings.frozen_weight_cast or self.strategy.name != "ddp":
            return None
        return FrozenWeightCast(self._unwrapped(), dtype)

    def _train(self, resume: bool) -> Path:
        settings, acc = self.settings, self.accelerator
        schedule = settings.schedule
        self.data.load_state_dict(DataPosition().state_dict())
        if resume:
            latest = latest_checkpoint(self.out_dir / "checkpoints")
            if latest is None:
                logger.warning("--resume: no checkpoint in %s; starting from scratch", self.out_dir)
            else:
                self._restore(latest)
        position = self.data.position  # advanced in place: what the "position" stateful saves
        set_train_modes(self._unwrapped(), settings.trains.modes)
        self.strategy.unwrap(self.accelerator, self.model).objective.train()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.total_steps, initial=position["step"], desc=f"train {self.stage_name}",
                   disable=not self.is_main, dynamic_ncols=True)
        window: Dict[str, float] = {}
        window_samples, window_tokens, window_start = 0, 0, time.perf_counter()
        micro, step_label_tokens = 0, 0
        guard = NonFiniteGuard(settings.nonfinite, self.stage_name, acc)
        self.skips = SkipCounter(self.stage_name, settings.max_image_failure_ratio, self.micro_per_epoch, acc)
        self.context.step = position["step"]
        with self._outside_steps():
            self.callbacks.on_train_start(self.context, position)
        batches = self._batches(position["epoch"], position["batch"])
        phase = StepPhases()
        try:
            while position["step"] < self.total_steps:
                epoch, index, batch = next(batches)
                last_of_epoch = index + 1 == self.micro_per_epoch
                phase("loading a batch")
                if not self.skips.observe(batch, position["step"] + 1):  # no sample left: skipped, counted
                    position.update(epoch=epoch + last_of_epoch, batch=0 if last_of_epoch else index + 1)
                    continue
                micro += 1
                sync = micro % schedule.grad_accum == 0 or last_of_epoch
                n = batch.num_samples
                # windows start at multiples of grad_accum in each epoch; an epoch's last may be shorter
                accum_start = index // schedule.grad_accum * schedule.grad_accum
                window_length = min(schedule.grad_accum, self.micro_per_epoch - accum_start)
                phase("the forward / backward pass (gradient all-reduce, parameter gathers)")
                context = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with context, acc.autocast():
                    out = self.model(batch)
                    weighted = out.tokens is not None and self.strategy.rescales_gradients
                    # a per-token loss is summed here and divided by the step's token count over
                    # every rank at the sync (DDP and FSDP average over ranks: hence the world size)
                    acc.backward(out.loss * out.tokens if weighted else out.loss / window_length)
                if weighted:
                    step_label_tokens = step_label_tokens + out.tokens.detach().to(torch.float64)
                if guard.observe_loss(out.loss):
                    for name, value in _losses(out).items():
                        window[name] = window.get(name, 0.0) + float(value) * n
                    window_samples += n
                    window_tokens += batch.num_tokens
                position.update(epoch=epoch, batch=index + 1, samples=position["samples"] + n)
                if last_of_epoch:
                    position.update(epoch=epoch + 1, batch=0)
                if not sync:
                    continue
                micro = 0
                if isinstance(step_label_tokens, torch.Tensor):
                    phase("the token count's all-reduce")
                    total = (acc.reduce(step_label_tokens, reduction="sum") if acc.num_processes > 1
                             else step_label_tokens)
                    self.strategy.scale_gradients(self.model, acc.num_processes / max(float(total), 1.0))
                step_label_tokens = 0
                grad_norm = None
                phase("gradient clipping (the norm's all-reduce)")
                if settings.optimization.max_grad_norm:
                    grad_norm = self.strategy.clip_grad_norm(acc, self.model, settings.optimization.max_grad_norm)
                if not guard.step_ok(grad_norm, self.model.parameters(), position["step"] + 1):
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                phase("the optimizer step")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                position["step"] += 1
                step = self.context.step = position["step"]
                bar.update(1)
                if step % schedule.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    phase("the loss all-reduce of a log record", step_done=True)
                    sums, all_samples = rank_sums(acc, {**window, TOKENS: float(window_tokens)}, window_samples)
                    all_tokens = int(sums.pop(TOKENS))
                    record = {"stage": self.stage_name, "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                              **{k: v / all_samples for k, v in sums.items()},
                              "lr": self.scheduler.get_last_lr()[0],
                              "samples": all_samples,
                              "samples_per_s": all_samples / max(elapsed, 1e-9),
                              "grad_norm": grad_norm,
                              **learning_rates(self.optimizer, self.scheduler),
                              "tokens": all_tokens, "tokens_per_s": all_tokens / max(elapsed, 1e-9)}
                    with self._outside_steps():
                        self._log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    samples_s=f"{record['samples_per_s']:.1f}", **self.context.progress)
                    window, window_samples, window_tokens, window_start = {}, 0, 0, time.perf_counter()
                phase("a checkpoint or a callback", step_done=True)
                saved = None
                if schedule.save_every and step % schedule.save_every == 0 and step < self.total_steps:
                    saved = self._save_step(step)
                with self._outside_steps():
                    self.callbacks.on_step_end(self.context, position)
                phase("the preemption check", step_done=True)
                if self.preemption.requested(acc):  # at the same step on every process
                    bar.close()
                    raise TrainingPreempted(self.stage_name, step, saved or self._save_step(step))
        except RuntimeError as exc:  # a collective that timed out or lost a peer: one line
            if acc.num_processes == 1 or isinstance(exc, TrainingError):
                raise
            step = position["step"] + (0 if phase.step_done else 1)
            failure = collective_failure(exc, acc.process_index, self.stage_name, step, phase.current,
                                         self.strategy.settings.collective_timeout_s)
            if failure is None:
                raise
            raise failure from None
        finally:
            # a stage that ends mid-epoch leaves its loader iterator suspended in the generator:
            # closing it shuts the DataLoader workers down now (they ignore SIGTERM, so an
            # interpreter exit that still held them would wait for them forever)
            batches.close()
        bar.close()
        if self.skips.skipped_samples:
            logger.warning(self.skips.summary())
        final = self.out_dir / "final"
        with self._outside_steps():
            self.save_checkpoint(final, with_training_state=False)
        with self._outside_steps():
            self.callbacks.on_train_end(self.context, final)
        if self.preemption.requested(acc):  # during the final save: the stage is complete
            raise TrainingPreempted(self.stage_name, position["step"], final)
        return final

    def _save_step(self, step: int) -> Path:
        """Write ``checkpoints/step_N`` with the training state, tell the callbacks, then (main
        process, the new checkpoint complete) keep only the ``keep_last`` newest."""
        folder = self.out_dir / "checkpoints" / f"step_{step:07d}"
        with self._outside_steps():
            self.save_checkpoint(folder, with_training_state=True)
        with self._outside_steps():
            self.callbacks.on_checkpoint(self.context, folder)
        keep_last = self.settings.schedule.keep_last
        if keep_last and self.is_main:
            removed = prune_checkpoints(folder.parent, keep_last, keep=folder)
            if removed:
                logger.info("keep_last %d: removed %s", keep_last, ", ".join(p.name for p in removed))
        return folder


TOKENS = "\0tokens"  # the real-token count of a window, summed over ranks beside the losses


def learning_rates(optimizer, scheduler) -> Dict[str, float]:
    """``lr_<group name>``: the learning rate of each parameter group (``lr`` is the first's; not
    ``lr/...``, which a file-based tracker store cannot keep beside ``lr``)."""
    return {f"lr_{group.get('name', i)}": lr
            for i, (group, lr) in enumerate(zip(optimizer.param_groups, scheduler.get_last_lr()))}


class OnDevice:
    """A streaming loader whose batches are moved to ``device`` (what accelerate's prepared
    loader does for a map-style one; a streaming dataset shards itself, so it is not prepared)."""

    def __init__(self, loader: DataLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch if self.device.type == "cpu" else batch.to(self.device)


def rank_sums(accelerator: Accelerator, window: Dict[str, float], samples: int):
    """The window's sample-weighted loss sums and sample count, summed over every process (so the
    logged losses are the means over all ranks' samples)."""
    if accelerator.num_processes == 1:
        return window, samples
    keys = sorted(window)
    values = torch.tensor([window[k] for k in keys] + [float(samples)], dtype=torch.float64,
                          device=accelerator.device)
    values = accelerator.reduce(values, reduction="sum")
    return dict(zip(keys, values[:-1].tolist())), int(values[-1].item())


def _losses(out) -> Dict[str, torch.Tensor]:
    """``loss`` plus any named partial losses a model reports in ``out.losses``."""
    losses = {"loss": out.loss.detach()}
    losses.update({k: v.detach() for k, v in (getattr(out, "losses", None) or {}).items()})
    return losses
