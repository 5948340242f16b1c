"""A stage of a run config built up to its trainer (model, data, objective, callbacks) and run."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from omegaconf import DictConfig
from transformers import set_seed

from vlm.app.prefs import stage_pairs
from vlm.checkpoint.components import load_model_state, save_model_state
from vlm.checkpoint.fsio import remove_stale_tmp
from vlm.checkpoint.manifest import read_manifest, unsaveable_lora
from vlm.checkpoint.pretrained import load_stage_tokenizer, require_stage_output
from vlm.config import Precision, TrainerSettings, WhatTrains, save_config, train_modes
from vlm.core.errors import ConfigError
from vlm.core.hardware import PrecisionChoice, detect, resolve_precision
from vlm.core.levers import LEVERS, LeverChoice, StageFacts, choose_levers, describe
from vlm.core.plugins import save_plugins
from vlm.data.batch import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.feature_cache import BuildReport, build_stage_feature_cache
from vlm.data.formats import read_samples
from vlm.data.image_cache import default_budget_bytes
from vlm.data.images import check_image_files
from vlm.data.pairs import PairCollator, PairDataset
from vlm.data.placement import with_recorded_placement
from vlm.data.samplers import LengthGroupedSampler
from vlm.data.streaming import StreamingConversations, stage_shards
from vlm.evaluation.runner import run_eval
from vlm.modeling.build import build_model
from vlm.modeling.processing import build_processor
from vlm.training.callbacks import Callback
from vlm.training.eval_callback import EvalDuringTraining, Evaluator
from vlm.training.objectives import OBJECTIVES, ObjectiveContext
from vlm.training.stages import apply_stage
from vlm.training.strategies import build_strategy, check_environment, check_launch
from vlm.training.tracking import TrackingCallback, TrackingSettings
from vlm.training.trainer import Trainer

logger = logging.getLogger(__name__)


def in_training_evaluator(cfg: DictConfig, name: str, tokenizer, out_dir: Path) -> Evaluator:
    """The evaluations stage ``name`` runs during training (its ``evals``, each capped to its
    ``max_samples_in_training``), as one function of the in-training model; results under ``out_dir``."""
    stage = cfg.stages[name]

    def evaluate(model) -> Dict[str, float]:
        scores: Dict[str, float] = {}
        for ev_name in stage.evals:
            ev = copy.deepcopy(cfg.evals[ev_name])
            if ev.max_samples_in_training:
                ev.data.max_samples = ev.max_samples_in_training
            processor = build_processor(model, tokenizer, cfg.model, ev.template or cfg.model.template)
            result = run_eval(model, processor, ev, out_dir, ev_name)
            scores.update({f"{ev_name}/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))})
        return scores

    return evaluate


PRECISION_FILE = "precision.json"  # beside a stage's outputs: what its precision resolved to, and why
LEVERS_FILE = "levers.json"  # ...and what each speed lever resolved to, and why


def resolved_precision(stage: DictConfig, name: str) -> Tuple[DictConfig, PrecisionChoice]:
    """A copy of ``stage`` whose ``precision`` is what it resolves to on this machine (``auto``:
    bf16 where the hardware runs it natively and faster, else fp32), and the choice, logged once."""
    choice = resolve_precision(stage.precision)
    logger.info("stage %s: precision %s -> %s: %s", name, choice.requested, choice.precision, choice.reason)
    if choice.warning:
        logger.warning("stage %s: %s", name, choice.warning)
    stage = copy.deepcopy(stage)
    stage.precision = Precision(choice.precision)
    return stage, choice


def _cores_per_process() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _passes(stage: DictConfig, num_samples: int, num_processes: int) -> float:
    """About how many times the stage goes through its samples (``epochs``, or what ``max_steps`` gives)."""
    if stage.max_steps:
        return stage.max_steps * stage.batch_size * stage.grad_accum * num_processes / max(1, num_samples)
    return float(stage.epochs)


def resolved_levers(stage: DictConfig, name: str, samples: Sequence,
                    num_processes: int = 1) -> Tuple[DictConfig, Dict[str, LeverChoice]]:
    """A copy of ``stage`` (its precision resolved) whose speed levers are the values they take
    on this machine (``auto``: on where they win on its hardware class), and the choices, logged
    once (vlm.core.levers)."""
    images = [str(path) for sample in samples for path in sample.images]
    rereads = _passes(stage, len(samples), num_processes) > 1 or len(set(images)) < len(images)
    facts = StageFacts(precision=Precision(stage.precision).value, rereads_images=rereads,
                       feature_cache=bool(stage.feature_cache), cores=_cores_per_process())
    choices = choose_levers({lever: stage[lever] for lever in LEVERS}, facts, detect(), f"stages.{name}")
    logger.info("stage %s: speed levers: %s", name, describe(choices))
    stage = copy.deepcopy(stage)
    for lever, choice in choices.items():
        stage[lever] = choice.value
    return stage, choices


def streaming_refusal(stage, model_cfg, objective_cls) -> Optional[str]:
    """Why a stage with a streaming source (webdataset / hf_dataset, ``streaming: true``) cannot
    run, or None: streamed samples are tokenised one by one in the DataLoader workers, as plain
    images (no AnyRes tiling, no video frames) and single conversations (no preference pairs);
    the frozen-feature cache indexes an in-memory list."""
    if stage.feature_cache:
        return "feature_cache: not available for a streaming stage (a webdataset or hf_dataset source with " \
               "streaming on); turn one of them off"
    if model_cfg.vision.tiling.enabled:
        return "a streaming source with model.vision.tiling: AnyRes samples are not streamed yet; set streaming: false"
    if objective_cls.reads_pairs:
        return f"objective {stage.objective} reads preference pairs, which are not streamed; set streaming: false"
    for index, data in enumerate(stage.data):
        if data.max_visual_tokens is not None:
            return (f"data.{index}.max_visual_tokens: a dataset's own budget is not applied to streamed samples; "
                    "set the stage's max_visual_tokens")
    return None


@dataclass
class StageRun:
    """A stage ready to train: its trainer, its dataset, the precision it resolved to and, with
    the feature cache on, the cache build's report."""

    trainer: Trainer
    dataset: ConversationDataset
    precision: PrecisionChoice
    feature_cache: Optional[BuildReport] = None
    levers: Optional[Dict[str, LeverChoice]] = None


def build_stage(cfg: DictConfig, name: str, out_dir: Optional[Path] = None, load_init: bool = True,
                callbacks: Sequence[Callback] = ()) -> StageRun:
    """Build stage ``name`` of a run config up to its trainer: the model (from ``init_from``
    unless ``load_init`` is False), the stage's train modes, its data (with the feature cache
    built when ``feature_cache`` is on) and the trainer writing under ``out_dir``
    (default ``<cfg.out_dir>/<name>``), calling ``callbacks``."""
    stage, precision = resolved_precision(cfg.stages[name], name)
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.out_dir) / name
    init_from = stage.init_from if load_init else None
    prior = read_manifest(require_stage_output(init_from, "init_from")) if init_from else None
    refusal = unsaveable_lora(train_modes(stage.train), cfg.model, prior)  # before step 1, not at the save
    if refusal:
        raise ConfigError(f"stages.{name}.train: {refusal}")
    # refuse what this launch cannot run before anything is built
    strategy = build_strategy(stage, f"stages.{name}")
    check_environment(strategy, f"stages.{name}")
    accelerator = strategy.make_accelerator()
    check_launch(accelerator, strategy, f"stages.{name}")
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / PRECISION_FILE).write_text(json.dumps(precision.as_record(), indent=2))
        for folder in (out_dir, out_dir / "checkpoints"):  # what killed runs left half-written
            remove_stale_tmp(folder)
    set_seed(stage.seed)
    tokenizer = load_stage_tokenizer(cfg.model, init_from)
    model = build_model(cfg.model, tokenizer)
    if init_from:
        load_model_state(model, init_from)
    objective_cls = OBJECTIVES.get(stage.objective)  # looked up once: what it freezes, then built
    apply_stage(model, WhatTrains.of(stage), objective_cls)
    processor = build_processor(model, tokenizer, cfg.model, stage.template, stage.max_length, stage.max_image_pixels,
                                stage.max_visual_tokens)
    objective = objective_cls.build(dict(stage.objective_options), ObjectiveContext(model, tokenizer))
    shards = stage_shards(stage.data, lambda data: read_samples([data], cfg.model.image_token), cfg.model.image_token)
    if shards is not None:
        refusal = streaming_refusal(stage, cfg.model, objective_cls)
        if refusal:
            raise ConfigError(f"stages.{name}: {refusal}")
    samples = read_samples(stage.data, cfg.model.image_token) if shards is None else []
    check_image_files([p for s in samples for p in s.images], f"stages.{name}.data", stage.max_image_failure_ratio)
    stage, levers = resolved_levers(stage, name, samples, accelerator.num_processes)
    if accelerator.is_main_process:
        (out_dir / LEVERS_FILE).write_text(json.dumps({k: c.as_record() for k, c in levers.items()}, indent=2))
    model.vision.use_channels_last(stage.channels_last)
    features, report = None, None
    if stage.feature_cache:
        root = stage.feature_cache_dir or Path(cfg.out_dir) / "feature_cache"
        features, report = build_stage_feature_cache(
            model, objective, processor, samples, WhatTrains.of(stage), stage.precision, root, name, accelerator,
            batch_size=stage.batch_size, num_workers=stage.num_workers, progress=accelerator.is_main_process)
    if shards is not None:
        dataset = StreamingConversations(
            shards, processor, batch_size=stage.batch_size, seed=stage.seed, rank=accelerator.process_index,
            world_size=accelerator.num_processes, num_workers=stage.num_workers, shuffle_buffer=stage.shuffle_buffer,
            group_by_length=stage.group_by_length, name=name)
    elif objective_cls.reads_pairs:
        dataset = PairDataset(samples, processor, name=name, progress=accelerator.is_main_process)
    else:
        dataset = ConversationDataset(
            samples, processor, name=name, progress=accelerator.is_main_process,
            image_features=features.load if features is not None else None,
            image_cache_bytes=default_budget_bytes(max(1, stage.num_workers)) if stage.image_cache else None,
            tokenize=token_cache(cfg, processor, name, accelerator))

    recorded_model = with_recorded_placement(cfg.model, samples)

    def save_state(trained_model, folder, state=None):
        save_model_state(trained_model, folder, train_modes(stage.train), recorded_model, tokenizer, prior,
                         state=state)
        save_plugins(folder, list(cfg.plugins))

    collate = Collator(tokenizer.pad_token_id, packing=stage.packing, max_length=stage.max_length)
    if objective_cls.reads_pairs:
        collate = PairCollator(tokenizer.pad_token_id)
    objective.prepare_data(model, dataset, collate, stage.batch_size, out_dir, accelerator.is_main_process)
    sampler = None
    if stage.group_by_length and shards is None:
        sampler = LengthGroupedSampler([len(ids) for _, ids, _ in dataset.entries],
                                       [bool(sample.images or sample.videos) for sample, _, _ in dataset.entries],
                                       stage.batch_size, stage.seed, accelerator.num_processes)
    if stage.eval_every and stage.evals:
        evaluate = in_training_evaluator(cfg, name, tokenizer, out_dir / "eval_during_training")
        callbacks = [*callbacks, EvalDuringTraining(evaluate, stage.eval_every, stage.keep_best)]
    tracking = tracking_settings(cfg)
    if tracking.active():  # after the eval callback: its records reach the trackers as they are logged
        callbacks = [*callbacks, TrackingCallback(tracking)]
    trainer = Trainer(model, dataset, collate=collate, settings=TrainerSettings.of(stage), strategy=strategy,
                      out_dir=out_dir, save_state=save_state, accelerator=accelerator, stage_name=name,
                      objective=objective, callbacks=callbacks, sampler=sampler)
    return StageRun(trainer, dataset, precision, report, levers)


def token_cache(cfg: DictConfig, processor, name: str, accelerator):
    """The stage's tokenisation through the token cache (vlm.data.token_cache), built by each
    node's local main process; None when ``token_cache`` is off."""
    if not cfg.token_cache:
        return None
    from vlm.data.token_cache import cached_tokenize, default_cache_root

    root = Path(cfg.token_cache_dir) if cfg.token_cache_dir else default_cache_root()
    return functools.partial(cached_tokenize, processor=processor, root=root, name=name,
                             progress=accelerator.is_main_process, builder=accelerator.is_local_main_process,
                             wait=accelerator.wait_for_everyone)


def tracking_settings(cfg: DictConfig) -> TrackingSettings:
    """The trackers of ``report_to`` with the run's name (``tracking.run_name``, else the name of
    ``out_dir``), project and resolved config."""
    from vlm.config import to_container

    run_name = cfg.tracking.run_name or Path(cfg.out_dir).resolve().name
    return TrackingSettings(list(cfg.report_to), Path(cfg.out_dir), run_name, cfg.tracking.project,
                            to_container(cfg))


def run_stage(cfg: DictConfig, name: str, resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Train stage ``name`` of a run config (calling ``callbacks``), after writing the pairs of its
    ``generate_pairs`` block if it has one; returns its ``final`` folder.
    With ``resume``, a stage whose ``final`` is already written (atomically: only a complete
    stage has one) is kept as it is, so a resumed multi-stage run retrains none of its finished
    stages."""
    final = Path(cfg.out_dir) / name / "final"
    if resume and final.is_dir():
        logger.info("stage %s: complete (%s); --resume keeps it", name, final)
        return final
    stage_pairs(cfg, name)  # the stage's generate_pairs block, if any: its data reads the pairs
    run = build_stage(cfg, name, callbacks=callbacks)
    return run.trainer.train(resume=resume)
