"""Structured configs: OmegaConf dataclasses, YAML loading, dotted overrides and validation.

A run config (a *recipe*) is a tree of the dataclasses below. Loading merges the YAML and the
command-line overrides into the schema, so an unknown key or a wrong type fails before any model
is built, with the full dotted key and the closest valid name. Component-specific ``options``
(free-form in the schema) are checked against the component's own options dataclass by
:func:`validate` once the registries are populated.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from vlm.registry import closest
from vlm.errors import ConfigError  # noqa: F401  (re-exported: vlm.config.ConfigError)




class Train(str, enum.Enum):
    """How a component is trained in a stage."""

    frozen = "frozen"
    lora = "lora"
    full = "full"


class Precision(str, enum.Enum):
    """Numeric precision of a training stage (autocast for bf16 / fp16)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


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


@dataclass
class ConnectorConfig:
    """A connector from vision features to LLM-width visual tokens."""

    name: str = "mlp2x_gelu"
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMConfig:
    """An HF causal LM: a local path / hub id, or an inline config (``arch.model_type`` + fields)."""

    name_or_path: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    attn_implementation: Optional[str] = None
    trust_remote_code: bool = False


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


@dataclass
class TrainModes:
    """What trains in a stage, per component."""

    vision: Train = Train.frozen
    connector: Train = Train.full
    llm: Train = Train.frozen


@dataclass
class LearningRates:
    """Per-component learning rates; None falls back to the stage's ``learning_rate``."""

    vision: Optional[float] = None
    connector: Optional[float] = None
    llm: Optional[float] = None


@dataclass
class StageConfig:
    """One training stage: what trains, on which data, with which schedule."""

    objective: str = "lm"
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
    precision: Precision = Precision.fp32
    seed: int = 42
    data: List[DataConfig] = field(default_factory=list)
    template: Optional[str] = None
    max_length: int = 512
    init_from: Optional[str] = None
    save_every: Optional[int] = None
    log_every: int = 10
    num_workers: int = 0
    # train from the frozen encoder's features, computed once and stored on disk
    # (vlm/training/features.py); None: <out_dir>/feature_cache
    feature_cache: bool = False
    feature_cache_dir: Optional[str] = None
    # evaluation during training (vlm/training/eval_callback.py): run these entries of ``evals``
    # every ``eval_every`` steps; ``keep_best: <eval>/<metric>`` keeps the best model in <stage>/best
    eval_every: Optional[int] = None
    evals: List[str] = field(default_factory=list)
    keep_best: Optional[str] = None


@dataclass
class EvalConfig:
    """One evaluation: ``caption`` (COCO captions file), ``vqa`` (VQAv2 questions/annotations) or
    ``retrieval`` (COCO captions file; image-text recall of a Q-Former model)."""

    task: str = "caption"
    data: DataConfig = field(default_factory=DataConfig)
    template: Optional[str] = None
    max_new_tokens: int = 24
    num_beams: int = 1
    batch_size: int = 16
    checkpoint: Optional[str] = None
    # retrieval only: re-rank each query's k best ITC candidates with the ITM head; None: ITC only
    rerank_k: Optional[int] = None
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
class PrepareConfig:
    """Steps a recipe runs before its stages; each is skipped when left unset."""

    shapes: Optional[ShapesDataConfig] = None
    tokenizer: Optional[TokenizerTrainConfig] = None


@dataclass
class RunConfig:
    """A recipe: preparation, a model, ordered stages and evaluations, all under ``out_dir``."""

    out_dir: str = "runs/default"
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: Dict[str, StageConfig] = field(default_factory=dict)
    evals: Dict[str, EvalConfig] = field(default_factory=dict)
    # free user variables for interpolation (``${vars.train_images}``); ``???`` marks one required
    vars: Dict[str, Any] = field(default_factory=dict)


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


_THEIR_HINT = re.compile(r"\.?\s*Did you mean:? '([^']*)'\?")


def _one_hint(msg: str, hint: str) -> str:
    """``msg`` + ``hint`` with a single "did you mean": OmegaConf's own suggestion (``. Did you
    mean: 'x'?``) is dropped from ``msg``, and used, in our format, only when we have none."""
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
    """Load a recipe YAML (or none), apply dotted ``key=value`` overrides, validate the schema.

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
            schema = OmegaConf.merge(schema, OmegaConf.load(path))
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
    _check_vars(schema, origin)
    validate(schema)
    return schema


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


def _check_options(options: Dict[str, Any], options_type, where: str) -> None:
    if options_type is None:
        if options:
            raise ConfigError(f"{where}: this component takes no options, got {sorted(options)}")
        return
    try:
        merged = OmegaConf.merge(OmegaConf.structured(options_type), OmegaConf.create(dict(options)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "key", None) or getattr(exc, "full_key", "") or ""
        hint = closest(str(key), _schema_fields(options_type)) if isinstance(exc, ConfigKeyError) else ""
        raise ConfigError(f"{where}.{key}: {_one_hint(str(exc).splitlines()[0], hint)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:  # options declared with omegaconf's MISSING have no default
        raise ConfigError(f"{where}.{missing[0]}: required, no default")


def _check_kwargs(args: Dict[str, Any], fn, where: str) -> None:
    params = inspect.signature(fn).parameters
    for key in args:
        if key not in params:
            raise ConfigError(f"{where}.{key}: not an argument of {fn.__name__}{closest(key, params)}")


def _check_feature_cache(stage, connector_cls, objective_cls, where: str) -> None:
    """A stage may train from cached features only if nothing it runs needs the encoder live."""
    if Train(stage.train.vision) is not Train.frozen:
        raise ConfigError(f"{where}: needs train.vision: frozen (cached features would go stale as "
                          f"the encoder trains); got '{Train(stage.train.vision).value}'")
    if not connector_cls.reads_features:
        raise ConfigError(f"{where}: connector {connector_cls.__name__} runs the vision encoder itself "
                          "and cannot read cached features")
    if objective_cls.needs_pixels:
        raise ConfigError(f"{where}: objective '{stage.objective}' reads the images itself")


def validate(cfg: DictConfig) -> None:
    """Check registry names, component options and reader arguments, without building anything."""
    from vlm.data.formats import READERS
    from vlm.data.image_transforms import PREPROCESSING
    from vlm.data.templates import TEMPLATES
    from vlm.modeling.connectors import CONNECTORS
    from vlm.modeling.llm import DTYPES  # imported here: vlm.modeling.llm imports this module
    from vlm.modeling.vision import VISION_ENCODERS
    from vlm.training.objectives import OBJECTIVES

    def lookup(registry, name, where):
        try:
            return registry.get(name)
        except KeyError as exc:
            raise ConfigError(f"{where}: {exc.args[0]}") from None

    model = cfg.model
    encoder_cls = lookup(VISION_ENCODERS, model.vision.name, "model.vision.name")
    _check_options(model.vision.options, encoder_cls.Options, "model.vision.options")
    encoder_cls.check_arch(dict(model.vision.arch), "model.vision.arch")
    if model.vision.preprocess is not None:
        lookup(PREPROCESSING, model.vision.preprocess, "model.vision.preprocess")
    connector_cls = lookup(CONNECTORS, model.connector.name, "model.connector.name")
    _check_options(model.connector.options, connector_cls.Options, "model.connector.options")
    connector_cls.check_options(dict(model.connector.options), "model.connector.options")
    required = connector_cls.requires_vision
    if required is not None and not issubclass(encoder_cls, required):
        needed = [n for n in VISION_ENCODERS.names() if issubclass(VISION_ENCODERS.get(n), required)]
        raise ConfigError(f"model.connector.name: connector '{model.connector.name}' runs inside a "
                          f"{' / '.join(repr(n) for n in needed)} vision encoder; model.vision.name is "
                          f"'{model.vision.name}'")
    if model.template != "tokenizer":
        lookup(TEMPLATES, model.template, "model.template")
    if model.llm.name_or_path is None and "model_type" not in model.llm.arch:
        raise ConfigError("model.llm: give name_or_path, or arch with a model_type")
    if model.llm.dtype not in DTYPES:
        raise ConfigError(f"model.llm.dtype: unknown dtype '{model.llm.dtype}'{closest(model.llm.dtype, DTYPES)}; "
                          f"known: {', '.join(sorted(DTYPES))}")

    def check_data(data, where):
        reader = lookup(READERS, data.format, f"{where}.format")
        _check_kwargs(data.args, reader, f"{where}.args")
        if data.repeat < 1:
            raise ConfigError(f"{where}.repeat: must be at least 1, got {data.repeat}")

    if cfg.prepare.tokenizer is not None:
        for i, data in enumerate(cfg.prepare.tokenizer.data):
            check_data(data, f"prepare.tokenizer.data.{i}")
    for name, stage in cfg.stages.items():
        where = f"stages.{name}"
        if stage.template is not None and stage.template != "tokenizer":
            lookup(TEMPLATES, stage.template, f"{where}.template")
        if not stage.data:
            raise ConfigError(f"{where}.data: a stage needs at least one dataset")
        for i, data in enumerate(stage.data):
            check_data(data, f"{where}.data.{i}")
        objective = lookup(OBJECTIVES, stage.objective, f"{where}.objective")
        objective.check_stage(stage, where)
        if any(getattr(stage.train, c) == Train.lora for c in ("vision", "connector")):
            raise ConfigError(f"{where}.train: LoRA is supported for the llm only")
        if stage.feature_cache:
            _check_feature_cache(stage, connector_cls, objective, f"{where}.feature_cache")
        _check_stage_evals(cfg, stage, where)
    for name, ev in cfg.evals.items():
        where = f"evals.{name}"
        expected = {"caption": "coco_captions", "vqa": "vqav2", "retrieval": "coco_captions"}
        if ev.task not in expected:
            raise ConfigError(f"{where}.task: unknown task '{ev.task}'{closest(ev.task, expected)}")
        if ev.data.format != expected[ev.task]:
            raise ConfigError(f"{where}.data.format: task '{ev.task}' reads '{expected[ev.task]}' data")
        check_data(ev.data, f"{where}.data")
        if ev.data.repeat != 1:
            raise ConfigError(f"{where}.data.repeat: an evaluation reads each sample once, got {ev.data.repeat}")
        if ev.task == "vqa" and not ev.data.args.get("annotations_path"):
            raise ConfigError(f"{where}.data.args.annotations_path: a vqa eval needs the VQAv2 "
                              "annotations file to score against")
        if ev.rerank_k is not None and (ev.task != "retrieval" or ev.rerank_k < 1):
            raise ConfigError(f"{where}.rerank_k: ITM re-ranking of the top k (k >= 1) applies to task "
                              f"'retrieval' only; got {ev.rerank_k} for task '{ev.task}'")


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


def to_container(cfg: DictConfig) -> dict:
    """A plain resolved dict of `cfg` (enums as their names), for saving beside a run."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
