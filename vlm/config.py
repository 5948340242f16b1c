"""Structured configs: OmegaConf dataclasses, YAML loading, dotted overrides and saving.

A run config (a *recipe*) is a tree of the dataclasses below. Loading merges the YAML and the
command-line overrides into the schema, so an unknown key or a wrong type fails before any model
is built, with the full dotted key and the closest valid name. This module is data only: it
knows no component. Registry names, component ``options`` (free-form here) and reader arguments
are checked by :func:`vlm.app.wiring.validate`; :func:`vlm.app.wiring.load_run_config` loads and
validates in one call. Importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vlm.core.errors import ConfigError  # noqa: F401  (re-exported: vlm.config.ConfigError)
from vlm.core.levers import AUTO, LEVERS, parse_lever
from vlm.core.registry import closest


class Train(str, enum.Enum):
    """How a component is trained in a stage."""

    frozen = "frozen"
    lora = "lora"
    full = "full"


class OnNonFinite(str, enum.Enum):
    """What a stage does on a non-finite loss or gradient norm."""

    stop = "stop"
    skip = "skip"


class MultiShapesKind(str, enum.Enum):
    """What ``prepare.multi`` writes: image pairs or clips of moving shapes."""

    pairs = "pairs"
    clips = "clips"


class Precision(str, enum.Enum):
    """Numeric precision of a training stage (autocast for bf16 / fp16). ``auto``: bf16 where the
    hardware runs it natively and faster, fp32 elsewhere (``vlm.core.hardware.resolve_precision``)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class TilingConfig:
    """AnyRes tiling (docs/resolution.md): each image as a grid of encoder-sized tiles chosen to
    fit its aspect ratio, plus a downscaled overview. ``grid_pinpoints``: the allowed grids as
    ``[height, width]`` pixel sizes (multiples of the encoder's image size), or ``max_tiles``: every
    grid of at most that many tiles (exactly one of the two); ``newline``: a learned row-end token
    after each row of the unpadded tile features (LLaVA-NeXT's ``image_newline``);
    ``pool_stride``: bilinear pooling of each tile's feature grid to ``ceil(side / stride)``;
    ``multi_image``: the images of a sample with several images are ``tiled`` as one image is, or
    ``base``: each its overview alone, padded to a square (LLaVA-OneVision)."""

    enabled: bool = False
    grid_pinpoints: Optional[List[List[int]]] = None
    max_tiles: Optional[int] = None
    newline: bool = True
    pool_stride: int = 1
    multi_image: str = "tiled"


@dataclass
class VisionConfig:
    """A vision encoder: registry name, weights (local path or hub id) or inline architecture."""

    name: str = "hf_clip"
    pretrained: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2
    keep_cls: bool = False
    preprocess: Optional[str] = None  # None: the encoder's own default (``default_preprocess``)
    options: Dict[str, Any] = field(default_factory=dict)
    tiling: TilingConfig = field(default_factory=TilingConfig)  # AnyRes (vlm/data/anyres.py)


@dataclass
class ConnectorConfig:
    """A connector from vision features to LLM-width visual tokens."""

    name: str = "mlp2x_gelu"
    options: Dict[str, Any] = field(default_factory=dict)


LLM_KINDS = ("causal", "seq2seq", "auto")  # what model.llm.kind may name


@dataclass
class LLMConfig:
    """An HF causal LM: a local path / hub id, or an inline config (``arch.model_type`` + fields)."""

    name_or_path: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False
    # one of LLM_KINDS: causal (decoder-only, AutoModelForCausalLM) | seq2seq (encoder-decoder
    # such as T5, AutoModelForSeq2SeqLM) | auto (the model config's is_encoder_decoder)
    kind: str = "causal"


@dataclass
class VideoConfig:
    """How a video reaches the model (docs/multi_image_video.md): ``num_frames`` frames spread
    evenly over the clip, or with ``fps`` one every 1/fps seconds (at most ``num_frames``); each
    frame's square grid of visual tokens pooled bilinearly by ``pool`` (1: not pooled);
    ``newline``: one learned ``image_newline`` after a video's last frame (LLaVA-OneVision; needs
    ``model.vision.tiling`` with ``newline``)."""

    num_frames: int = 8
    fps: Optional[float] = None
    pool: int = 2
    newline: bool = False


@dataclass
class ModelConfig:
    """The whole vision-language model and its default chat template."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_token: str = "<image>"
    template: str = "vicuna_v1"
    system_prompt: Optional[str] = None
    # appended to each question `vlm chat` asks (saved in the stage output's model.yaml): the
    # prompt format of the training data, e.g. the vqav2 reader's answer-format suffix
    task_prompt_suffix: Optional[str] = None
    video: VideoConfig = field(default_factory=VideoConfig)
    # where a prompt's images stand (vlm.data.placement): "first" in their user turn or
    # "positional"; null: recorded in the stage output's model.yaml from the stage's training data
    image_placement: Optional[str] = None


@dataclass
class LoraConfig:
    """PEFT LoRA settings; ``target_modules`` None means every linear layer except lm_head."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[List[str]] = None


@dataclass
class DataConfig:
    """One dataset: a reader name from ``vlm.data.formats.READERS`` and that reader's arguments."""

    format: str = "llava_json"
    args: Dict[str, Any] = field(default_factory=dict)
    max_samples: Optional[int] = None
    # each sample appears this many times per epoch (after max_samples): up-weights a dataset in a mix
    repeat: int = 1
    # the visual tokens one sample of this dataset may hold, instead of the stage's
    # max_visual_tokens (vlm/data/budget.py); None: the stage's
    max_visual_tokens: Optional[int] = None


@dataclass
class TrainModes:
    """What trains in a stage, per component."""

    vision: Train = Train.frozen
    connector: Train = Train.full
    llm: Train = Train.frozen


COMPONENTS = ("vision", "connector", "llm")  # the fields of TrainModes, in build order


def train_modes(train: TrainModes) -> Dict[str, Train]:
    """Each component's mode of a stage's ``train`` section, as ``Train`` members."""
    return {comp: Train(getattr(train, comp)) for comp in COMPONENTS}


@dataclass
class LearningRates:
    """Per-component learning rates; None falls back to the stage's ``learning_rate``."""

    vision: Optional[float] = None
    connector: Optional[float] = None
    llm: Optional[float] = None


@dataclass
class GeneratePairsConfig:
    """Preference pairs a stage writes before it trains, from a checkpoint's own sampled answers
    (``vlm prefs generate``'s settings): the questions of ``evals.<eval>``, scored by ``judge``."""

    out: Optional[str] = None  # the pairs JSON (required); kept as it is when already complete
    checkpoint: Optional[str] = None  # whose answers are sampled; None: the stage's init_from
    eval: str = "vqa"
    judge: str = "vqa_accuracy"
    n: int = 4
    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: Optional[int] = None  # None: the eval entry's
    batch_size: int = 16
    seed: int = 0


@dataclass
class StageConfig:
    """One training stage: what trains, on which data, with which schedule."""

    objective: str = "lm"
    # the objective's options (its Options dataclass, e.g. dpo's beta), checked by vlm.app.wiring
    objective_options: Dict[str, Any] = field(default_factory=dict)
    train: TrainModes = field(default_factory=TrainModes)
    lora: LoraConfig = field(default_factory=LoraConfig)
    learning_rate: float = 1e-3
    lr: LearningRates = field(default_factory=LearningRates)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    precision: Precision = Precision.auto
    seed: int = 42
    data: List[DataConfig] = field(default_factory=list)
    template: Optional[str] = None
    max_length: int = 512
    init_from: Optional[str] = None
    save_every: Optional[int] = None  # None or 0: no step checkpoints (final/ is always written)
    keep_last: Optional[int] = None  # keep only the N newest checkpoints/step_* (None: all)
    log_every: int = 10
    # speed levers (vlm/core/levers.py): auto, the default, turns each on only where it wins on
    # the hardware class and precision the stage runs on; true / false (a number of DataLoader
    # worker processes for num_workers) override
    num_workers: Any = "auto"
    channels_last: Any = "auto"  # CNN encoders: channels-last convolutions
    training_attention: Any = "auto"  # sdpa with an fp32 kernel under CPU autocast (modeling/attention.py)
    frozen_weight_cast: Any = "auto"  # under autocast, frozen weights cast once (training/frozen_weights.py)
    image_cache: Any = "auto"  # decoded, transformed images kept in memory (data/image_cache.py)
    # a non-finite loss or gradient norm: stop the stage (TrainingError), or skip the step
    # (no optimizer update), at most max_nonfinite_skips times
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    max_nonfinite_skips: int = 10
    # the stage stops when more than this fraction of the samples it has loaded had unreadable images
    max_image_failure_ratio: float = 0.5
    # with several processes: a collective (gradient all-reduce, FSDP gather, ...) waiting longer
    # than this stops every rank with one line naming the rank, the step and what it waited on;
    # None: torch's default (30 min). Set by the first stage that starts the process group.
    collective_timeout_s: Optional[float] = None
    # images with more pixels are refused before decoding (ImageLoadError)
    max_image_pixels: int = 40_000_000
    # per sample: visual tokens beyond this first cost tiles, then more pooling (vlm/data/budget.py);
    # a sample that still does not fit is left out and counted. None: no budget
    max_visual_tokens: Optional[int] = None
    # train from the frozen encoder's features, computed once and stored on disk
    # (vlm/training/features.py); None: <out_dir>/feature_cache
    feature_cache: bool = False
    feature_cache_dir: Optional[str] = None
    # how the stage spreads over processes: a name of vlm.training.strategies.STRATEGIES
    # (ddp | fsdp | zero2 | zero3), checked by vlm.app.wiring.validate
    strategy: str = "ddp"
    # recompute activations in the backward pass (LLM, and the vision encoder when it trains)
    gradient_checkpointing: bool = False
    # fsdp: keep parameters, gradients and optimizer state on the CPU (zero2 / zero3: the optimizer)
    fsdp_cpu_offload: bool = False
    # pack several samples into each row up to max_length (vlm/data/packing.py; objective lm)
    packing: bool = False
    # batches of similar length, image and text-only samples apart (vlm/training/samplers.py)
    group_by_length: bool = False
    # a streaming stage (a webdataset / hf_dataset source with streaming on; vlm/data/streaming.py):
    # each DataLoader worker shuffles its records through a buffer of this many
    shuffle_buffer: int = 1000
    # compile the model's repeated blocks (decoder / encoder layers) with torch.compile for the
    # training steps (vlm/training/compile.py); a speed lever like those above
    compile: Any = "auto"
    # evaluation during training (vlm/training/eval_callback.py): run these entries of ``evals``
    # every ``eval_every`` steps; ``keep_best: <eval>/<metric>`` keeps the best model in <stage>/best
    eval_every: Optional[int] = None
    evals: List[str] = field(default_factory=list)
    keep_best: Optional[str] = None
    # preference pairs generated before training (vlm.app.prefs.stage_pairs); None: none
    generate_pairs: Optional[GeneratePairsConfig] = None


# The parts of a stage each consumer reads (the YAML keeps its flat keys; these are views of it).


def resolved(precision, consumer: str) -> Precision:
    """``precision`` as a concrete ``Precision``; ValueError naming ``consumer`` when it is still
    ``auto`` (what runs a stage needs the precision ``vlm.core.hardware.resolve_precision`` chose)."""
    precision = Precision(precision)
    if precision is Precision.auto:
        raise ValueError(f"precision 'auto' reached {consumer} unresolved: resolve it first "
                         "(vlm.core.hardware.resolve_precision)")
    return precision


def resolved_lever(stage, name: str, consumer: str):
    """Speed lever ``name`` of ``stage`` as a concrete value (bool, or an int for
    ``num_workers``); ValueError naming ``consumer`` when it is still ``auto``
    (``vlm.core.levers.choose_levers`` decides those)."""
    raw = getattr(stage, name)
    value = parse_lever(name, raw, name)
    if value == AUTO:
        raise ValueError(f"{name} 'auto' reached {consumer} unresolved: resolve it first "
                         "(vlm.core.levers.choose_levers)")
    return value


@dataclass(frozen=True)
class WhatTrains:
    """What a stage trains: each component's mode, the LoRA settings, the objective's name
    (read by ``apply_stage``, the checkpoint writer and the trainer's train / eval modes)."""

    modes: Dict[str, Train]
    lora: LoraConfig
    objective: str

    @classmethod
    def of(cls, stage) -> "WhatTrains":
        """The part of a stage (a ``StageConfig`` or its DictConfig)."""
        lora = stage.lora if isinstance(stage.lora, LoraConfig) else LoraConfig(
            **OmegaConf.to_container(stage.lora, resolve=True))
        return cls(train_modes(stage.train), lora, str(stage.objective))


@dataclass(frozen=True)
class Optimization:
    """How parameters update: learning rates (per component, else the stage's), weight decay,
    gradient clipping (read by the optimizer's parameter groups and the training loop)."""

    learning_rate: float
    component_lr: Dict[str, Optional[float]]
    weight_decay: float
    max_grad_norm: Optional[float]

    @classmethod
    def of(cls, stage) -> "Optimization":
        """The part of a stage (a ``StageConfig`` or its DictConfig)."""
        return cls(float(stage.learning_rate), {c: getattr(stage.lr, c) for c in COMPONENTS},
                   float(stage.weight_decay), stage.max_grad_norm)

    def lr(self, component: str) -> float:
        """The learning rate of ``component`` (its own, else the stage's)."""
        rate = self.component_lr.get(component)
        return self.learning_rate if rate is None else float(rate)


@dataclass(frozen=True)
class Schedule:
    """How long a stage runs and in which steps: batches, accumulation, epochs or steps, warm-up
    and decay, the seed, how often it logs and checkpoints (read by the training loop)."""

    batch_size: int
    grad_accum: int
    epochs: float
    max_steps: Optional[int]
    warmup_ratio: float
    min_lr_ratio: float
    seed: int
    log_every: int
    save_every: Optional[int]
    keep_last: Optional[int] = None

    @classmethod
    def of(cls, stage) -> "Schedule":
        """The part of a stage (a ``StageConfig`` or its DictConfig)."""
        return cls(**{f.name: getattr(stage, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class NonFinitePolicy:
    """What a stage does on a non-finite loss or gradient norm (read by ``NonFiniteGuard``)."""

    on_nonfinite: OnNonFinite
    max_nonfinite_skips: int

    @classmethod
    def of(cls, stage) -> "NonFinitePolicy":
        """The part of a stage (a ``StageConfig`` or its DictConfig)."""
        return cls(OnNonFinite(stage.on_nonfinite), int(stage.max_nonfinite_skips))


@dataclass(frozen=True)
class TrainerSettings:
    """The parts of a stage the trainer reads: what trains, optimisation, schedule, the
    non-finite policy, the resolved precision and speed levers, and how batches are loaded.
    Data sources, templates, distribution and evaluation reach it already built, never as config."""

    trains: WhatTrains
    optimization: Optimization
    schedule: Schedule
    nonfinite: NonFinitePolicy
    precision: Precision
    compile: bool
    num_workers: int
    max_image_failure_ratio: float
    training_attention: bool = False
    frozen_weight_cast: bool = False

    @classmethod
    def of(cls, stage) -> "TrainerSettings":
        """The part of a stage whose precision and levers are resolved (``auto`` is refused: the
        trainer runs one concrete precision and one value per lever)."""
        precision = resolved(stage.precision, "the trainer")
        levers = {name: resolved_lever(stage, name, "the trainer")
                  for name in ("compile", "num_workers", "training_attention", "frozen_weight_cast")}
        return cls(WhatTrains.of(stage), Optimization.of(stage), Schedule.of(stage), NonFinitePolicy.of(stage),
                   precision, max_image_failure_ratio=float(stage.max_image_failure_ratio), **levers)


@dataclass
class EvalDataConfig(DataConfig):
    """An evaluation's dataset; ``format`` None: the task's own (``vlm.evaluation.tasks``)."""

    format: Optional[str] = None


@dataclass
class EvalConfig:
    """One evaluation: a task from ``vlm.evaluation.tasks.TASKS`` (``caption``: COCO captions
    file; ``vqa``: VQAv2 questions/annotations; ``retrieval``: COCO captions file, image-text
    recall of a Q-Former model)."""

    task: str = "caption"
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    template: Optional[str] = None
    max_new_tokens: int = 24
    num_beams: int = 1
    batch_size: int = 16
    checkpoint: Optional[str] = None
    # retrieval only: re-rank each query's k best ITC candidates with the ITM head; None: ITC only
    rerank_k: Optional[int] = None
    # images with more pixels are refused before decoding (the sample is skipped and counted)
    max_image_pixels: int = 40_000_000
    # cap on the samples read when a stage runs this eval during training (stages.<name>.evals)
    max_samples_in_training: Optional[int] = None


@dataclass
class ShapesDataConfig:
    """Synthetic shapes data written by the ``prepare`` step."""

    out: str = "data/shapes"
    num_train: int = 2000
    num_test: int = 200
    image_size: int = 64
    seed: int = 0
    # multiplies the shapes' sizes (0.1-1.6); large images with small shapes: docs/resolution.md
    shape_scale: float = 1.0


@dataclass
class TokenizerTrainConfig:
    """A tokenizer trained from scratch on text files (for demos without hub access)."""

    out: str = "tokenizer"
    files: List[str] = field(default_factory=list)
    # datasets read with vlm's readers (format + args, as a stage's data): every turn's text
    data: List[DataConfig] = field(default_factory=list)
    vocab_size: int = 512
    min_frequency: int = 1


@dataclass
class ScenesDataConfig:
    """Synthetic shapes scenes (several shapes per image, COCO instances for POPE) written by ``prepare``."""

    out: str = "data/scenes"
    shapes_per_image: str = "2-4"  # MIN-MAX distinct shape kinds per image
    num_train: int = 2000
    num_test: int = 200
    image_size: int = 64
    seed: int = 0


@dataclass
class MultiShapesDataConfig:
    """Synthetic image pairs or clips (several images / video per sample) written by ``prepare``;
    the files land under ``out`` as ``vlm data shapes --kind KIND`` writes them."""

    out: str = "data/multi"
    kind: MultiShapesKind = MultiShapesKind.clips  # pairs: questions across two images; clips: video
    num_train: int = 1500
    num_test: int = 100
    image_size: int = 64
    num_frames: int = 8  # frames per clip (kind "clips")
    seed: int = 0


@dataclass
class PrepareConfig:
    """Steps a recipe runs before its stages; each is skipped when left unset."""

    shapes: Optional[ShapesDataConfig] = None
    # further shapes datasets, each under its own ``out`` (e.g. encoder-size images for a vision
    # warm-up beside large images for AnyRes), written after ``shapes``
    extra_shapes: List[ShapesDataConfig] = field(default_factory=list)
    tokenizer: Optional[TokenizerTrainConfig] = None
    scenes: Optional[ScenesDataConfig] = None  # written before the tokenizer is trained
    multi: Optional[MultiShapesDataConfig] = None  # written before the tokenizer is trained


@dataclass
class TrackingConfig:
    """Where the experiment trackers of ``report_to`` file a run (docs/tracking.md)."""

    project: str = "vlm"  # the wandb project / mlflow experiment
    run_name: Optional[str] = None  # None: the name of out_dir


@dataclass
class RunConfig:
    """A recipe: preparation, a model, ordered stages and evaluations, all under ``out_dir``."""

    out_dir: str = "runs/default"
    # modules imported before the config is validated: their imports register components
    plugins: List[str] = field(default_factory=list)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    evals: Dict[str, EvalConfig] = field(default_factory=dict)
    # free user variables for interpolation (``${vars.train_images}``); ``???`` marks one required
    vars: Dict[str, Any] = field(default_factory=dict)
    # experiment trackers, names of vlm.training.trackers.TRACKERS (jsonl | tensorboard | wandb | mlflow);
    # metrics.jsonl is always written (docs/tracking.md)
    report_to: List[str] = field(default_factory=lambda: ["jsonl"])
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # tokenised samples cached on disk and reused (vlm/data/token_cache.py); None: $VLM_CACHE_DIR,
    # else $XDG_CACHE_HOME/vlm, else ~/.cache/vlm (under it, tokenized/)
    token_cache: bool = True
    token_cache_dir: Optional[str] = None


def _schema_fields(node_type) -> list[str]:
    return [f.name for f in dataclasses.fields(node_type)] if dataclasses.is_dataclass(node_type) else []


def _unwrap(tp) -> tuple[Any, bool]:
    """(inner type, whether `tp` was a container) for Optional / List / Dict annotations."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        return args[-1], True
    if origin is typing.Union and len(args) == 1:
        return _unwrap(args[0])
    return tp, False


def _dataclass_at(path: str):
    """The dataclass that holds the last key of a dotted `path` (for suggestions)."""
    node: Any = RunConfig
    skip_next = False
    for part in [p for p in path.split(".") if p][:-1]:
        if skip_next:  # a dict key or list index
            skip_next = False
            continue
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node, skip_next = _unwrap(hints[part])
    return node if dataclasses.is_dataclass(node) else None


# OmegaConf's suggestion: "Did you mean: 'x'?" or "Did you mean one of: 'x', 'y'?"
_THEIR_HINT = re.compile(r"\.?\s*Did you mean(?: one of)?:? '([^']*)'(?:, '[^']*')*\?")


def _one_hint(msg: str, hint: str) -> str:
    """``msg`` + ``hint`` with a single "did you mean": OmegaConf's own suggestion (``. Did you
    mean: 'x'?`` or ``. Did you mean one of: 'x', 'y'?``) is dropped from ``msg``, and its first
    name used, in our format, only when we have none."""
    theirs = _THEIR_HINT.search(msg)
    msg = _THEIR_HINT.sub("", msg)
    if not hint and theirs:
        hint = f" (did you mean '{theirs.group(1)}'?)"
    return f"{msg}{hint}"


def _explain(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    hint = ""
    if isinstance(exc, ConfigKeyError) and key:
        holder = _dataclass_at(key)
        if holder is not None:
            hint = closest(key.split(".")[-1], _schema_fields(holder))
    return ConfigError(f"{origin}: invalid config key '{key}': {_one_hint(msg, hint)}")


def _plain_string_if_not_yaml(item: str) -> str:
    """``key=value`` with ``value`` quoted when it is not valid YAML, so that a value such as
    ``{image_id:012d}.png`` (a file-name pattern) is taken as the string it is."""
    import yaml

    key, value = item.split("=", 1)
    try:
        yaml.safe_load(value)
    except yaml.YAMLError:
        return f"{key}={json.dumps(value)}"
    return item


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), **defaults) -> DictConfig:
    """Load a recipe YAML (or none), apply dotted ``key=value`` overrides, check the schema
    (keys and types; not registry names: :func:`vlm.app.wiring.load_run_config` does both).

    ``defaults`` are set before the file (``out_dir=...`` from the command line, for instance).
    """
    schema = OmegaConf.structured(RunConfig)
    origin = str(path) if path else "<defaults>"
    try:
        if defaults:
            schema = OmegaConf.merge(schema, OmegaConf.create(defaults))
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            loaded = OmegaConf.load(path)
            try:
                schema = OmegaConf.merge(schema, loaded)
            except TypeError:  # a mapping where the schema has a list, or the other way round
                key = _container_mismatch(schema, loaded)
                raise ConfigError(f"{origin}: {key or 'the file'}: a mapping where a list is expected, "
                                  "or a list where a mapping is") from None
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key=value")
        if overrides:
            origin = f"{origin} with overrides {list(overrides)}"
            for item in overrides:
                item = _plain_string_if_not_yaml(item)
                try:
                    schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([item]))
                except TypeError:  # a list index (data.0.format=...): merge cannot address list items
                    schema.merge_with_dotlist([item])
        if defaults:  # command-line values win over the file
            schema = OmegaConf.merge(schema, OmegaConf.create(defaults))
    except (ConfigKeyError, ValidationError, OmegaConfBaseException) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _explain(exc, origin) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{origin}: not UTF-8 at byte {exc.start}; re-save the file as UTF-8") from None
    check_ranges(schema, origin)
    _check_vars(schema, origin)
    for name, stage in schema.stages.items():
        _check_stage_evals(schema, stage, f"stages.{name}")
    return schema


def _container_mismatch(schema, loaded, prefix: str = "") -> Optional[str]:
    """The dotted key of the first value of ``loaded`` that is a list where ``schema`` has a
    mapping or the other way round; None if there is none."""
    if not isinstance(loaded, DictConfig) or not isinstance(schema, DictConfig):
        return None
    for key in loaded:
        if key not in schema:
            continue
        ours, theirs = schema._get_node(key), loaded._get_node(key)
        containers = isinstance(ours, (ListConfig, DictConfig)) and isinstance(theirs, (ListConfig, DictConfig))
        if containers and isinstance(ours, ListConfig) != isinstance(theirs, ListConfig) and not ours._is_none():
            return f"{prefix}{key}"
        found = _container_mismatch(ours, theirs, f"{prefix}{key}.")
        if found:
            return found
    return None


def _positive(v) -> bool:
    return v > 0


def _at_least_one(v) -> bool:
    return v >= 1


def _non_negative(v) -> bool:
    return v >= 0


def _fraction(v) -> bool:
    return 0 <= v < 1


def _unit(v) -> bool:
    return 0 <= v <= 1


# (dotted key under a stage / an eval / the run, test, what the value must be); None values pass
_STAGE_RANGES = [
    ("learning_rate", _positive, "> 0"),
    ("lr.vision", _positive, "> 0"), ("lr.connector", _positive, "> 0"), ("lr.llm", _positive, "> 0"),
    ("weight_decay", _non_negative, ">= 0"),
    ("warmup_ratio", _fraction, "in [0, 1)"),
    ("min_lr_ratio", _unit, "in [0, 1]"),
    ("epochs", _positive, "> 0"),
    ("max_steps", _at_least_one, ">= 1"),
    ("batch_size", _at_least_one, ">= 1"),
    ("grad_accum", _at_least_one, ">= 1"),
    ("max_grad_norm", _non_negative, ">= 0 (0 or null: no clipping)"),
    ("max_length", _at_least_one, ">= 1"),
    ("save_every", _non_negative, ">= 0 (0 or null: no step checkpoints)"),
    ("keep_last", _at_least_one, ">= 1 (or null: keep every step checkpoint)"),
    ("log_every", _at_least_one, ">= 1"),
    ("max_nonfinite_skips", _non_negative, ">= 0"),
    ("max_image_failure_ratio", _unit, "in [0, 1]"),
    ("collective_timeout_s", _positive, "> 0 (or null: torch's default)"),
    ("max_image_pixels", _at_least_one, ">= 1"),
    ("max_visual_tokens", _at_least_one, ">= 1 (or null: no budget)"),
    ("lora.r", _at_least_one, ">= 1"),
    ("lora.alpha", _positive, "> 0"),
    ("lora.dropout", _fraction, "in [0, 1)"),
    ("generate_pairs.n", _at_least_one, ">= 1"),
    ("generate_pairs.temperature", _positive, "> 0"),
    ("generate_pairs.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("generate_pairs.max_new_tokens", _at_least_one, ">= 1 (or null: the eval entry's)"),
    ("generate_pairs.batch_size", _at_least_one, ">= 1"),
]
_EVAL_RANGES = [
    ("batch_size", _at_least_one, ">= 1"),
    ("max_new_tokens", _at_least_one, ">= 1"),
    ("num_beams", _at_least_one, ">= 1"),
    ("max_image_pixels", _at_least_one, ">= 1"),
]
_DATA_RANGES = [("max_samples", _at_least_one, ">= 1 (or null: all)"), ("repeat", _at_least_one, ">= 1"),
                ("max_visual_tokens", _at_least_one, ">= 1 (or null: the stage's)")]
_SHAPES_RANGES = [
    ("num_train", _non_negative, ">= 0"), ("num_test", _non_negative, ">= 0"), ("image_size", _at_least_one, ">= 1"),
    ("shape_scale", lambda v: 0.1 <= v <= 1.6, "in [0.1, 1.6]"),
]
_PREPARE_RANGES = [(f"prepare.shapes.{key}", test, must) for key, test, must in _SHAPES_RANGES] + [
    ("prepare.scenes.num_train", _non_negative, ">= 0"), ("prepare.scenes.num_test", _non_negative, ">= 0"),
    ("prepare.scenes.image_size", lambda v: v >= 48, ">= 48"),
    ("prepare.multi.num_train", _non_negative, ">= 0"), ("prepare.multi.num_test", _non_negative, ">= 0"),
    ("prepare.multi.image_size", lambda v: v >= 32, ">= 32"),
    ("prepare.multi.num_frames", lambda v: v >= 2, ">= 2"),
    ("prepare.tokenizer.vocab_size", _at_least_one, ">= 1"),
    ("prepare.tokenizer.min_frequency", _at_least_one, ">= 1"),
    ("model.video.num_frames", _at_least_one, ">= 1"),
    ("model.video.fps", _positive, "> 0 (or null: num_frames)"),
    ("model.video.pool", _at_least_one, ">= 1"),
]


def _check_range(node, key: str, test, must: str, where: str, origin: str) -> None:
    value = OmegaConf.select(node, key)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if value != value or not test(value):  # NaN fails every test
        raise ConfigError(f"{origin}: {where}{key} = {value}: must be {must}")


def _check_levers(stage, where: str, origin: str) -> None:
    """ConfigError naming the key for a speed lever that is not auto / true / false (auto or a
    worker count for ``num_workers``)."""
    for name in LEVERS:
        value = stage.get(name, AUTO)
        parse_lever(name, value, f"{origin}: {where}{name}")


def check_ranges(cfg: DictConfig, origin: str = "config") -> None:
    """ConfigError naming the dotted key and its value for any numeric field outside its domain
    (learning rates > 0, batch_size >= 1, warmup_ratio in [0, 1), ...) and any speed lever that
    is not auto / true / false. Pure: builds nothing."""
    for key, test, must in _PREPARE_RANGES:
        _check_range(cfg, key, test, must, "", origin)
    for i, shapes in enumerate(cfg.prepare.extra_shapes):
        for key, test, must in _SHAPES_RANGES:
            _check_range(shapes, key, test, must, f"prepare.extra_shapes.{i}.", origin)
    for name, stage in cfg.stages.items():
        _check_levers(stage, f"stages.{name}.", origin)
        for key, test, must in _STAGE_RANGES:
            _check_range(stage, key, test, must, f"stages.{name}.", origin)
        for i, data in enumerate(stage.data):
            for key, test, must in _DATA_RANGES:
                _check_range(data, key, test, must, f"stages.{name}.data.{i}.", origin)
    for name, ev in cfg.evals.items():
        for key, test, must in _EVAL_RANGES:
            _check_range(ev, key, test, must, f"evals.{name}.", origin)
        for key, test, must in _DATA_RANGES:
            _check_range(ev.data, key, test, must, f"evals.{name}.data.", origin)


def _check_stage_evals(cfg: DictConfig, stage, where: str) -> None:
    """``evals`` name entries of ``cfg.evals``, need ``eval_every`` >= 1; ``keep_best`` is
    ``<one of them>/<metric>``."""
    for name in stage.evals:
        if name not in cfg.evals:
            raise ConfigError(f"{where}.evals: no eval '{name}' in evals{closest(name, list(cfg.evals))}; "
                              f"evals: {list(cfg.evals)}")
    if stage.evals and (stage.eval_every is None or stage.eval_every < 1):
        raise ConfigError(f"{where}.eval_every: evals {list(stage.evals)} need eval_every >= 1 (steps), "
                          f"got {stage.eval_every}")
    if stage.keep_best is not None:
        name = stage.keep_best.split("/", 1)[0]
        if "/" not in stage.keep_best or name not in stage.evals:
            raise ConfigError(f"{where}.keep_best: expected '<eval>/<metric>' with <eval> one of the stage's "
                              f"evals {list(stage.evals)}, got '{stage.keep_best}'")


def _check_vars(cfg: DictConfig, origin: str) -> None:
    """ConfigError naming every ``vars`` entry left at ``???`` (a recipe's required variables)."""
    missing = sorted(OmegaConf.missing_keys(cfg.vars)) if "vars" in cfg else []
    if missing:
        sets = " ".join(f"{k}=..." for k in missing)  # missing_keys gives full keys (vars.x)
        raise ConfigError(f"{origin}: required variable(s) not set: {', '.join(missing)} "
                          f"(set them on the command line: {sets})")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:  # e.g. ${vars.typo}: name the key and the bad reference
        key = getattr(exc, "full_key", None) or ""
        raise ConfigError(f"{origin}: cannot resolve '{key}': {str(exc).splitlines()[0]}") from None


def to_container(cfg: DictConfig) -> dict:
    """A plain resolved dict of `cfg` (enums as their names), for saving beside a run."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
