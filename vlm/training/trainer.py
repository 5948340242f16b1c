"""The accelerate-based training loop for one stage.

It runs on one CPU, one GPU, or many processes launched by ``accelerate launch`` (DDP, FSDP and
DeepSpeed through accelerate's config). Gradient accumulation, clipping, warmup + cosine
schedule, bf16 / fp16 autocast, tqdm progress with loss / lr / samples/s, JSON-lines metrics, a
loss-curve PNG, atomic checkpoints and exact resume all live here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from vlm.config import Precision, StageConfig
from vlm.training import checkpoint as ckpt
from vlm.training.callbacks import Callback, CallbackList
from vlm.training.objectives import LanguageModeling, Objective
from vlm.training.stages import parameter_groups, set_train_modes

logger = logging.getLogger(__name__)

MIXED_PRECISION = {Precision.fp32: "no", Precision.bf16: "bf16", Precision.fp16: "fp16"}


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends only on ``seed`` and the epoch, so resume can replay it."""

    def __init__(self, length: int, seed: int):
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def make_accelerator(precision: Precision) -> Accelerator:
    """An Accelerator for one stage. accelerate keeps one process-wide state, fixed at its first
    mixed-precision setting; a later stage with another precision resets it first."""
    from accelerate.state import AcceleratorState

    mixed = MIXED_PRECISION[Precision(precision)]
    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed)) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed)


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
    """Trains ``model`` on ``dataset`` as ``stage`` says, writing under ``out_dir``.

    ``save_state(model, folder)`` writes the model part of a checkpoint (weights, manifest,
    tokenizer); the trainer adds the training state and makes the write atomic. ``callbacks``
    (:mod:`vlm.training.callbacks`) are called at the start, after each step, on each log
    record, after each checkpoint and at the end.
    """

    def __init__(self, model, dataset, collate: Callable, stage: StageConfig, out_dir: str | Path,
                 save_state: Callable, accelerator: Optional[Accelerator] = None, stage_name: str = "stage",
                 objective: Optional[Objective] = None, callbacks: Sequence[Callback] = ()):
        self.stage = stage
        self.callbacks = CallbackList(callbacks)
        self.stage_name = stage_name
        self.out_dir = Path(out_dir)
        self.save_state = save_state
        self.accelerator = accelerator or make_accelerator(stage.precision)
        self.dataset = dataset
        if len(dataset) == 0:
            raise ValueError(f"stage '{stage_name}': no trainable samples")
        self.sampler = EpochShuffleSampler(len(dataset), stage.seed)
        # the loader's own generator: creating an iterator must not draw from the global torch
        # RNG, or a resumed run (which creates one mid-epoch) shifts every dropout mask after it
        loader = DataLoader(dataset, batch_size=stage.batch_size, sampler=self.sampler,
                            collate_fn=collate, num_workers=stage.num_workers, drop_last=False,
                            generator=torch.Generator().manual_seed(stage.seed))
        objective = objective if objective is not None else LanguageModeling(model, None)
        groups = parameter_groups(model, stage)
        extra = [p for p in objective.parameters() if p.requires_grad]
        if extra:  # an objective's own head learns at the vision rate (it reads vision features)
            lr = stage.lr.vision if stage.lr.vision is not None else stage.learning_rate
            groups.append({"params": extra, "lr": lr, "weight_decay": stage.weight_decay, "name": "objective"})
        optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
        self.model, self.optimizer, self.loader = self.accelerator.prepare(
            TrainingModule(model, objective), optimizer, loader)
        self.micro_per_epoch = len(self.loader)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / stage.grad_accum)
        self.total_steps = stage.max_steps or max(1, math.ceil(self.steps_per_epoch * stage.epochs))
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(stage.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps, min_lr_rate=stage.min_lr_ratio,
        )
        self.history: List[dict] = []
        # extra progress-bar fields callbacks may set (evaluation scores)
        self.progress_extras: Dict[str, str] = {}

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model).model

    def save_checkpoint(self, folder: Path, position: Optional[dict]) -> None:
        """Atomically write the model state (and, with a position, the training state)."""
        self.accelerator.wait_for_everyone()
        if self.is_main:
            with ckpt.atomic_dir(folder) as tmp:
                self.save_state(self._unwrapped(), tmp)
                if position is not None:
                    objective = self.accelerator.unwrap_model(self.model).objective
                    ckpt.save_training_state(tmp, self.optimizer, self.scheduler, position,
                                             objective.state_dict())
        self.accelerator.wait_for_everyone()

    def _restore(self, folder: Path) -> dict:
        ckpt.load_trained_state(self._unwrapped(), folder, self.stage)
        state = ckpt.load_training_state(folder)
        self.accelerator.unwrap_model(self.model).objective.load_state_dict(state.get("objective", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", folder, state["position"]["step"])
        return state["position"]

    def _batches(self, start_epoch: int, start_batch: int):
        """(epoch, batch index, batch) from a data position onwards, forever."""
        epoch, skip = start_epoch, start_batch
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
        """Run the stage to ``total_steps``; returns the ``final`` output folder."""
        stage, acc = self.stage, self.accelerator
        position = {"step": 0, "epoch": 0, "batch": 0, "samples": 0}
        if resume:
            latest = ckpt.latest_checkpoint(self.out_dir / "checkpoints")
            if latest is None:
                logger.warning("--resume: no checkpoint in %s; starting from scratch", self.out_dir)
            else:
                position = self._restore(latest)
        set_train_modes(self._unwrapped(), stage)
        self.accelerator.unwrap_model(self.model).objective.train()
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if position["step"] == 0:
                metrics_path.unlink(missing_ok=True)
            elif metrics_path.is_file():  # drop what a run that went past the checkpoint logged
                lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
                kept = [line for line in lines if json.loads(line)["step"] <= position["step"]]
                metrics_path.write_text("".join(line + "\n" for line in kept))
        bar = tqdm(total=self.total_steps, initial=position["step"], desc=f"train {self.stage_name}",
                   disable=not self.is_main, dynamic_ncols=True)
        window: Dict[str, float] = {}
        window_samples, window_start = 0, time.perf_counter()
        micro = 0
        self.callbacks.on_train_start(self, position)
        batches = self._batches(position["epoch"], position["batch"])
        while position["step"] < self.total_steps:
            epoch, index, batch = next(batches)
            last_of_epoch = index + 1 == self.micro_per_epoch
            micro += 1
            sync = micro % stage.grad_accum == 0 or last_of_epoch
            n = batch["input_ids"].shape[0]
            context = contextlib.nullcontext() if sync else acc.no_sync(self.model)
            with context, acc.autocast():
                out = self.model(batch)
                acc.backward(out.loss / stage.grad_accum)
            for name, value in _losses(out).items():
                window[name] = window.get(name, 0.0) + float(value) * n
            window_samples += n
            position.update(epoch=epoch, batch=index + 1, samples=position["samples"] + n)
            if last_of_epoch:
                position.update(epoch=epoch + 1, batch=0)
            if not sync:
                continue
            micro = 0
            grad_norm = None
            if stage.max_grad_norm:
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), stage.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            position["step"] += 1
            step = position["step"]
            bar.update(1)
            if step % stage.log_every == 0 or step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"stage": self.stage_name, "step": step, "epoch": round(step / self.steps_per_epoch, 4),
                          **{k: v / window_samples for k, v in window.items()},
                          "lr": self.scheduler.get_last_lr()[0],
                          "samples": window_samples * acc.num_processes,
                          "samples_per_s": window_samples * acc.num_processes / max(elapsed, 1e-9),
                          "grad_norm": grad_norm}
                self.callbacks.on_log(self, record)
                self.history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.1f}", **self.progress_extras)
                if self.is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                window, window_samples, window_start = {}, 0, time.perf_counter()
            if stage.save_every and step % stage.save_every == 0 and step < self.total_steps:
                folder = self.out_dir / "checkpoints" / f"step_{step:07d}"
                self.save_checkpoint(folder, position)
                self.callbacks.on_checkpoint(self, folder)
            self.callbacks.on_step_end(self, position)
        bar.close()
        final = self.out_dir / "final"
        self.save_checkpoint(final, None)
        if self.is_main:
            plot_losses(metrics_path, self.out_dir / "loss.png")
        self.callbacks.on_train_end(self, final)
        return final


def _losses(out) -> Dict[str, torch.Tensor]:
    """``loss`` plus any named partial losses a model reports in ``out.losses``."""
    losses = {"loss": out.loss.detach()}
    losses.update({k: v.detach() for k, v in (getattr(out, "losses", None) or {}).items()})
    return losses


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
