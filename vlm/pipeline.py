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
from vlm.data.processor import VLMProcessor
from vlm.data.templates import build_template
from vlm.data.types import Sample
from vlm.modeling.llm import load_tokenizer
from vlm.modeling.vlm import VisionLanguageModel
from vlm.training import checkpoint as ckpt
from vlm.training.callbacks import Callback
from vlm.training.eval_callback import build_eval_callback
from vlm.training.features import BuildReport, build_stage_feature_cache
from vlm.training.objectives import build_objective
from vlm.training.stages import apply_stage
from vlm.training.trainer import Trainer, make_accelerator

logger = logging.getLogger(__name__)


def load_stage_tokenizer(model_cfg, init_from: Optional[str]):
    """The tokenizer saved with ``init_from`` when given, else the one the model config names."""
    if init_from:
        return AutoTokenizer.from_pretrained(str(Path(init_from) / "tokenizer"))
    return load_tokenizer(model_cfg.llm, model_cfg.image_token)


def build_processor(model: VisionLanguageModel, tokenizer, model_cfg, template: Optional[str] = None,
                    max_length: int = 2048) -> VLMProcessor:
    """A processor matching ``model``: its image transform and its number of image tokens."""
    return VLMProcessor(
        tokenizer,
        build_template(template or model_cfg.template, tokenizer, model_cfg.system_prompt),
        model.vision.image_transform(),
        model.num_image_tokens,
        image_token=model_cfg.image_token,
        max_length=max_length,
    )


def load_pretrained(folder: str | Path, device: Optional[str] = None) -> Tuple[VisionLanguageModel, object, DictConfig]:
    """Rebuild a trained model from a stage output folder: ``(model, tokenizer, model_cfg)``,
    on ``device`` (default: CUDA when available, else CPU)."""
    folder = Path(folder)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(folder / "model.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = VisionLanguageModel.from_config(model_cfg, tokenizer)
    ckpt.load_model_state(model, folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer, model_cfg


def read_samples(data_cfgs) -> List[Sample]:
    """Read and concatenate every dataset of a stage (``max_samples``, then ``repeat``, applied
    per dataset)."""
    samples: List[Sample] = []
    for data in data_cfgs:
        part = read_dataset(data.format, **dict(data.args))
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
    accelerator = make_accelerator(stage.precision)
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    set_seed(stage.seed)
    tokenizer = load_stage_tokenizer(cfg.model, init_from)
    model = VisionLanguageModel.from_config(cfg.model, tokenizer)
    prior = None
    if init_from:
        ckpt.load_model_state(model, init_from)
        prior = ckpt.read_manifest(init_from)
    apply_stage(model, stage)
    processor = build_processor(model, tokenizer, cfg.model, stage.template, stage.max_length)
    objective = build_objective(stage.objective, model, tokenizer)
    samples = read_samples(stage.data)
    features, report = None, None
    if stage.feature_cache:
        root = stage.feature_cache_dir or Path(cfg.out_dir) / "feature_cache"
        features, report = build_stage_feature_cache(model, objective, processor, samples, stage, root, name,
                                                     accelerator, progress=accelerator.is_main_process)
    dataset = ConversationDataset(samples, processor, name=name, progress=accelerator.is_main_process,
                                  image_features=features.load if features is not None else None)

    def save_state(trained_model, folder):
        ckpt.save_model_state(trained_model, folder, stage, cfg.model, tokenizer, prior)

    evaluation = build_eval_callback(
        cfg, name, lambda m, template: build_processor(m, tokenizer, cfg.model, template))
    callbacks = list(callbacks) + ([evaluation] if evaluation is not None else [])
    trainer = Trainer(model, dataset, processor.collate, stage, out_dir, save_state, accelerator, name,
                      objective=objective, callbacks=callbacks)
    return StageRun(trainer, dataset, report)


def run_stage(cfg: DictConfig, name: str, resume: bool = False) -> Path:
    """Train stage ``name`` of a run config; returns its ``final`` folder."""
    run = build_stage(cfg, name)
    final = run.trainer.train(resume=resume)
    if run.dataset.image_failures:
        logger.warning("stage %s: %d sample(s) skipped for unreadable images", name, run.dataset.image_failures)
    return final
