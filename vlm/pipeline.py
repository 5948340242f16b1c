"""Glue between configs and components: build or load a model, its processor, and run a stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, set_seed

from vlm.config import ModelConfig, save_config
from vlm.data.dataset import ConversationDataset
from vlm.data.formats import read_dataset
from vlm.data.images import DEFAULT_MAX_PIXELS, check_image_files
from vlm.data.packing import PackingCollator
from vlm.data.processor import VLMProcessor
from vlm.data.templates import build_template
from vlm.data.types import IMAGE_TOKEN, Sample
from vlm.errors import CheckpointError
from vlm.modeling.llm import load_tokenizer
from vlm.modeling.vlm import VisionLanguageModel
from vlm.training import checkpoint as ckpt
from vlm.training.callbacks import Callback
from vlm.training.eval_callback import build_eval_callback
from vlm.training.features import BuildReport, build_stage_feature_cache
from vlm.training.objectives import build_objective
from vlm.training.skips import CountingCollate
from vlm.training.samplers import LengthGroupedSampler
from vlm.training.stages import apply_stage
from vlm.training.strategies import build_strategy, check_environment, check_launch
from vlm.training.trainer import Trainer
from vlm.wiring import load_saved_plugins, save_plugins

logger = logging.getLogger(__name__)


def load_stage_tokenizer(model_cfg, init_from: Optional[str]):
    """The tokenizer saved with ``init_from`` when given, else the one the model config names."""
    if init_from:
        require_stage_output(init_from, "init_from")
        return AutoTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
    return load_tokenizer(model_cfg.llm, model_cfg.image_token)


def require_stage_output(folder: str | Path, what: str) -> Path:
    """``folder`` as a Path; a CheckpointError naming ``what`` unless it is a vlm stage output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{what} {folder}: no such folder; give a stage output (e.g. runs/NAME/STAGE/final)")
    missing = [n for n in ("manifest.json", "model.yaml", "tokenizer") if not (folder / n).exists()]
    if missing:
        raise CheckpointError(f"{what} {folder}: not a vlm stage output ({', '.join(missing)} missing)")
    return folder


def build_processor(model: VisionLanguageModel, tokenizer, model_cfg, template: Optional[str] = None,
                    max_length: int = 2048, max_image_pixels: int = DEFAULT_MAX_PIXELS) -> VLMProcessor:
    """A processor matching ``model``: its image transform and its number of image tokens."""
    return VLMProcessor(
        tokenizer,
        build_template(template or model_cfg.template, tokenizer, model_cfg.system_prompt),
        model.vision.image_transform(),
        model.num_image_tokens,
        image_token=model_cfg.image_token,
        max_length=max_length,
        max_image_pixels=max_image_pixels,
    )


def load_pretrained(folder: str | Path, device: Optional[str] = None,
                    trust_remote_code: bool = False) -> Tuple[VisionLanguageModel, object, DictConfig]:
    """Rebuild a trained model from a stage output folder: ``(model, tokenizer, model_cfg)``,
    on ``device`` (default: CUDA when available, else CPU).

    ``trust_remote_code`` comes from the caller (a CLI flag, the user's own config), never from
    the folder: the ``model.yaml`` of a checkpoint someone sent cannot switch it on."""
    folder = require_stage_output(folder, "checkpoint")
    load_saved_plugins(folder)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(folder / "model.yaml"))
    if model_cfg.llm.trust_remote_code and not trust_remote_code:
        logger.warning("%s/model.yaml sets llm.trust_remote_code; ignored (pass --trust-remote-code to allow it)",
                       folder)
    model_cfg.llm.trust_remote_code = bool(trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = VisionLanguageModel.from_config(model_cfg, tokenizer)
    ckpt.load_model_state(model, folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, model_cfg


def read_samples(data_cfgs, image_token: str = IMAGE_TOKEN) -> List[Sample]:
    """Read and concatenate every dataset of a stage (``max_samples``, then ``repeat``, applied
    per dataset); ``image_token`` marks the images in their texts (the model's)."""
    samples: List[Sample] = []
    for data in data_cfgs:
        part = read_dataset(data.format, image_token=image_token, **dict(data.args))
        samples.extend((part[: data.max_samples] if data.max_samples else part) * data.repeat)
    return samples


@dataclass
class StageRun:
    """A stage ready to train: its trainer, its dataset and, with the feature cache on, the
    cache build's report."""

    trainer: Trainer
    dataset: ConversationDataset
    feature_cache: Optional[BuildReport] = None


def build_stage(cfg: DictConfig, name: str, out_dir: Optional[Path] = None, load_init: bool = True,
                callbacks: Sequence[Callback] = ()) -> StageRun:
    """Build stage ``name`` of a run config up to its trainer: the model (from ``init_from``
    unless ``load_init`` is False), the stage's train modes, its data (with the feature cache
    built when ``feature_cache`` is on) and the trainer writing under ``out_dir``
    (default ``<cfg.out_dir>/<name>``), calling ``callbacks``."""
    stage = cfg.stages[name]
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.out_dir) / name
    init_from = stage.init_from if load_init else None
    # refuse what this launch cannot run before anything is built
    strategy = build_strategy(stage, f"stages.{name}")
    check_environment(strategy, f"stages.{name}")
    accelerator = strategy.make_accelerator()
    check_launch(accelerator, strategy, f"stages.{name}")
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
        for folder in (out_dir, out_dir / "checkpoints"):  # what killed runs left half-written
            ckpt.remove_stale_tmp(folder)
    set_seed(stage.seed)
    tokenizer = load_stage_tokenizer(cfg.model, init_from)
    model = VisionLanguageModel.from_config(cfg.model, tokenizer)
    prior = None
    if init_from:
        ckpt.load_model_state(model, init_from)
        prior = ckpt.read_manifest(init_from)
    apply_stage(model, stage)
    processor = build_processor(model, tokenizer, cfg.model, stage.template, stage.max_length, stage.max_image_pixels)
    objective = build_objective(stage.objective, model, tokenizer)
    samples = read_samples(stage.data, cfg.model.image_token)
    check_image_files([p for s in samples for p in s.images], f"stages.{name}.data", stage.max_image_failure_ratio)
    features, report = None, None
    if stage.feature_cache:
        root = stage.feature_cache_dir or Path(cfg.out_dir) / "feature_cache"
        features, report = build_stage_feature_cache(model, objective, processor, samples, stage, root, name,
                                                     accelerator, progress=accelerator.is_main_process)
    dataset = ConversationDataset(samples, processor, name=name, progress=accelerator.is_main_process,
                                  image_features=features.load if features is not None else None)

    def save_state(trained_model, folder, state=None):
        ckpt.save_model_state(trained_model, folder, stage, cfg.model, tokenizer, prior, state=state)
        save_plugins(folder, list(cfg.plugins))

    collate = PackingCollator(tokenizer.pad_token_id, stage.max_length) if stage.packing else processor.collate
    sampler = None
    if stage.group_by_length:
        sampler = LengthGroupedSampler([len(ids) for _, ids, _ in dataset.entries],
                                       [bool(sample.images) for sample, _, _ in dataset.entries],
                                       stage.batch_size, stage.seed, accelerator.num_processes)
    evaluation = build_eval_callback(
        cfg, name, lambda m, template: build_processor(m, tokenizer, cfg.model, template))
    callbacks = list(callbacks) + ([evaluation] if evaluation is not None else [])
    trainer = Trainer(model, dataset, collate=CountingCollate(collate), stage=stage, out_dir=out_dir,
                      save_state=save_state, accelerator=accelerator, stage_name=name,
                      objective=objective, callbacks=callbacks, strategy=strategy, sampler=sampler)
    return StageRun(trainer, dataset, report)


def run_stage(cfg: DictConfig, name: str, resume: bool = False, callbacks: Sequence[Callback] = ()) -> Path:
    """Train stage ``name`` of a run config (calling ``callbacks``); returns its ``final`` folder."""
    run = build_stage(cfg, name, callbacks=callbacks)
    return run.trainer.train(resume=resume)
