"""``vlm bench train CONFIG --stage S --against hf``: training throughput of vlm against transformers.

vlm side: the stage exactly as ``vlm train`` runs it (its dataset, collator, packing, sampler,
objective and the Trainer loop), timed by a :class:`~vlm.training.callbacks.Callback` between
consecutive optimizer steps (data loading, forward, backward, clipping, optimizer and schedule
included).

transformers side: the same model as a ``LlavaForConditionalGeneration`` (weights copied through
:func:`vlm.interop.hf_llava.to_hf_llava`), the same trainable parameters (connector full, LoRA
on the same LLM linears when the stage trains the LLM with LoRA, or the LLM in full), AdamW
with the same learning rates, gradient clipping, the same precision (autocast), fed the same
dataset items in a plain per-epoch shuffle, padded to the longest row (what a transformers
training loop does by default).

The two alternate step by step in one process (the callback runs one transformers step after
each vlm step), so a shared, noisy machine slows both alike. Before timing, both models score
the same padded first batch in fp32: the losses must agree (same network, same weights).
Throughput counts real samples and real (non-padding) tokens only.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig

from vlm.app.env import environment
from vlm.app.wiring import validate
from vlm.checkpoint.components import save_model_state
from vlm.checkpoint.fsio import atomic_dir
from vlm.config import COMPONENTS, Precision, Train
from vlm.core.errors import ConfigError
from vlm.training.callbacks import Callback


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFLlavaSide:
    """A transformers LLaVA copy of the stage's model, trained on padded batches of the same items."""

    def __init__(self, model, stage, dataset, collate, precision: Precision, device: torch.device, seed: int):
        from vlm.data.samplers import EpochShuffleSampler
        from vlm.interop.hf_llava import to_hf_llava

        self.llava = to_hf_llava(model).to(device)
        self.device = device
        self.dataset = dataset
        self.collate = collate
        self.precision = Precision(precision)
        self.stage = stage
        self.order = list(EpochShuffleSampler(len(dataset), seed))
        self.cursor = 0
        self.step_seconds: List[float] = []
        self.step_samples: List[int] = []
        self.step_tokens: List[int] = []
        self.optimizer = torch.optim.AdamW(self._groups(), betas=(0.9, 0.999))

    def _groups(self) -> List[dict]:
        """Freeze / LoRA / train the components as the stage says; AdamW groups per component."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import inject_adapter_in_model

        stage, inner = self.stage, self.llava.model
        self.llava.requires_grad_(False)
        parts = {"vision": [inner.vision_tower], "connector": [inner.multi_modal_projector],
                 "llm": [inner.language_model, self.llava.lm_head]}
        groups = []
        for component, modules in parts.items():
            mode = Train(getattr(stage.train, component))
            if mode is Train.lora:
                lora = stage.lora
                target = list(lora.target_modules) if lora.target_modules else "all-linear"
                config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                        target_modules=target)
                inject_adapter_in_model(config, inner.language_model)
            params = []
            for module in modules:
                for name, param in module.named_parameters():
                    if mode is Train.full or (mode is Train.lora and "lora_" in name):
                        param.requires_grad_(True)
                        params.append(param)
            lr = getattr(stage.lr, component)
            lr = stage.learning_rate if lr is None else lr
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups += [g for g in ({"params": decay, "lr": lr, "weight_decay": stage.weight_decay},
                                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]
        self.llava.train()
        return groups

    def _autocast(self):
        if self.precision is Precision.fp32:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision is Precision.bf16 else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def inputs(self, batch) -> Dict:
        """A padded vlm batch (:class:`vlm.data.batch.Batch`) as ``LlavaForConditionalGeneration``
        keyword arguments."""
        batch = batch.to(self.device)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "pixel_values": batch.images,
                "labels": batch.labels}

    def loss(self, batch) -> torch.Tensor:
        return self.llava(**self.inputs(batch)).loss

    def step(self, batch_size: int) -> None:
        """One timed training step on the next ``batch_size`` items of the shuffle (loading included)."""
        _sync(self.device)
        start = time.perf_counter()
        indices = [self.order[(self.cursor + i) % len(self.order)] for i in range(batch_size)]
        self.cursor += batch_size
        batch = self.collate([self.dataset[i] for i in indices])
        with self._autocast():
            loss = self.loss(batch)
        loss.backward()
        if self.stage.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.stage.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        self.step_seconds.append(time.perf_counter() - start)
        self.step_samples.append(batch.num_samples)
        self.step_tokens.append(int(batch.attention_mask.sum()))


class AlternatingTimer(Callback):
    """Times each vlm optimizer step (end of the previous step to the end of this one, minus the
    transformers step run in between) and runs one transformers step after it."""

    def __init__(self, batch_size: int):
        self.other: Optional[HFLlavaSide] = None  # set once the stage (and its dataset) is built
        self.batch_size = batch_size
        self.device = torch.device("cpu")
        self.step_seconds: List[float] = []
        self.samples: List[int] = []
        self._last = 0.0
        self._samples_before = 0

    def on_train_start(self, ctx, position) -> None:
        _sync(self.device)
        self._last = time.perf_counter()
        self._samples_before = position["samples"]

    def on_step_end(self, ctx, position) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.step_seconds.append(now - self._last)
        self.samples.append(position["samples"] - self._samples_before)
        self._samples_before = position["samples"]
        self.other.step(self.batch_size)
        self._last = time.perf_counter()


def _tokens_per_step(trainer, dataset, steps: int, batch_size: int) -> List[int]:
    """Real tokens of each of the vlm trainer's first ``steps`` batches (its sampler, epoch 0)."""
    trainer.sampler.set_epoch(0)
    order = list(trainer.sampler)
    lengths = [len(ids) for _, ids, _ in dataset.entries]
    return [sum(lengths[order[(s * batch_size + i) % len(order)]] for i in range(batch_size)) for s in range(steps)]


def _side(seconds: List[float], samples: List[int], tokens: List[int], warmup: int) -> dict:
    """Throughput after ``warmup`` steps; the warmup steps' seconds (where compilation happens)
    and the throughput counting them are reported too."""
    warm_s, all_s, all_samples = sum(seconds[:warmup]), sum(seconds), sum(samples)
    seconds, samples, tokens = seconds[warmup:], samples[warmup:], tokens[warmup:]
    total = sum(seconds)
    return {"steps": len(seconds), "samples": sum(samples), "seconds": round(total, 3),
            "median_step_s": round(statistics.median(seconds), 4),
            "samples_per_s": round(sum(samples) / total, 2), "tokens_per_s": round(sum(tokens) / total, 1),
            "warmup_s": round(warm_s, 3), "samples_per_s_with_warmup": round(all_samples / all_s, 2)}


def bench_train(cfg: DictConfig, stage_name: str, steps: int = 30, warmup: int = 3,
                precision: Optional[str] = None, work_dir: Optional[str | Path] = None,
                prepare: bool = False) -> dict:
    """Train ``stage_name`` for ``warmup + steps`` steps in vlm and in transformers, alternating
    step by step; return samples/s and real tokens/s per side (after ``warmup``), their ratios
    and both sides' fp32 loss on the same padded first batch. ``precision`` overrides the
    stage's. The model is built from ``cfg.model`` with random weights (the stage's own
    ``init_from`` is not read); everything is written under ``work_dir`` (default
    ``<out_dir>/bench_train``)."""
    from transformers import set_seed

    from vlm.app.recipes import run_prepare
    from vlm.app.stages import build_stage
    from vlm.checkpoint.pretrained import load_stage_tokenizer
    from vlm.modeling.build import build_model

    if stage_name not in cfg.stages:
        raise ConfigError(f"--stage: no stage '{stage_name}'; stages: {list(cfg.stages)}")
    if warmup < 1 or steps < 1:
        raise ConfigError("--steps and --warmup must be at least 1")
    if prepare:
        run_prepare(cfg)
    cfg = copy.deepcopy(cfg)
    stage = cfg.stages[stage_name]
    if precision is not None:
        stage.precision = Precision(precision)
    if stage.objective != "lm":
        raise ConfigError(f"stages.{stage_name}.objective: --against hf compares the 'lm' objective "
                          f"(transformers' causal LM loss); got '{stage.objective}'")
    stage.max_steps = warmup + steps
    stage.save_every = None
    stage.log_every = warmup + steps
    stage.grad_accum = 1
    work = Path(work_dir) if work_dir else Path(cfg.out_dir) / "bench_train"
    init = work / "init"
    stage.init_from = str(init)  # written below: a random-weight model (validation needs it named)
    validate(cfg)

    # one random-weight model, written as the stage's init_from (so vlm trains exactly these
    # weights and its final save works whatever the stage trains) and copied to transformers
    set_seed(stage.seed)
    tokenizer = load_stage_tokenizer(cfg.model, None)
    reference = build_model(cfg.model, tokenizer)
    everything = {comp: Train.full for comp in COMPONENTS}
    with atomic_dir(init) as tmp:
        save_model_state(reference, tmp, everything, cfg.model, tokenizer, None)
    timer = AlternatingTimer(stage.batch_size)
    run = build_stage(cfg, stage_name, out_dir=work / "vlm", callbacks=[timer])
    trainer = run.trainer
    device = trainer.accelerator.device
    processor_collate = _padded_collate(trainer)
    hf = HFLlavaSide(reference, stage, run.dataset, processor_collate, run.precision.precision, device, stage.seed)
    timer.other, timer.device = hf, device
    del reference

    # the same padded first batch through both, fp32, before any step
    first = processor_collate([run.dataset[i] for i in hf.order[:stage.batch_size]])
    vlm_model = trainer._unwrapped()
    with torch.no_grad():
        was_training = vlm_model.training
        vlm_model.eval()
        hf.llava.eval()
        vlm_loss = float(vlm_model(**first.to(device).model_inputs(), return_logits=False).loss)
        hf_loss = float(hf.loss(first))
        vlm_model.train(was_training)
        hf.llava.train()

    trainer.train()
    vlm_tokens = _tokens_per_step(trainer, run.dataset, len(timer.step_seconds), stage.batch_size)
    ours = _side(timer.step_seconds, timer.samples, vlm_tokens, warmup)
    theirs = _side(hf.step_seconds, hf.step_samples, hf.step_tokens, warmup)
    return {
        "stage": stage_name, "precision": run.precision.as_record(), "device": str(device),
        "env": environment(),
        "batch_size": stage.batch_size, "packing": bool(stage.packing), "group_by_length": bool(stage.group_by_length),
        "steps": steps, "warmup_steps": warmup,
        "vlm": ours, "transformers": theirs,
        "ratio_samples_per_s": round(ours["samples_per_s"] / theirs["samples_per_s"], 3),
        "ratio_tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "ratio_median_step": round(theirs["median_step_s"] / ours["median_step_s"], 3),
        "ratio_samples_per_s_with_warmup": round(ours["samples_per_s_with_warmup"]
                                                 / theirs["samples_per_s_with_warmup"], 3),
        "compile": bool(run.levers["compile"].value),
        "levers": {name: choice.as_record() for name, choice in run.levers.items()},
        "first_batch_loss": {"vlm": round(vlm_loss, 6), "transformers": round(hf_loss, 6),
                             "abs_diff": abs(vlm_loss - hf_loss)},
    }


def _padded_collate(trainer):
    """The plain right-padding collate (what the unpacked trainer uses)."""
    from vlm.data.batch import Collator

    return Collator(trainer.dataset.processor.tokenizer.pad_token_id)
