"""The composition root: the one list of registries and the checks of a run config against
what is registered.

``vlm.config`` is pure data; this module knows the components. :func:`load_run_config` is the one
entry point that loads a recipe *and* validates it (every command, benchmark and test uses it);
:func:`validate` checks registry names, component options and reader arguments without building
anything, importing only the components the config names.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlm.config import STRATEGY_NAMES, Train, _one_hint, _schema_fields, load_config
from vlm.core.errors import ConfigError
from vlm.core.plugins import load_plugins
from vlm.core.registry import Registry, closest, import_object, load_entry_point_plugins

# every registry, by the kind ``vlm models`` lists it under: "module:ATTRIBUTE"
REGISTRIES: Dict[str, str] = {
    "vision_encoders": "vlm.modeling.vision.registry:VISION_ENCODERS",
    "connectors": "vlm.modeling.connectors.registry:CONNECTORS",
    "templates": "vlm.data.templates:TEMPLATES",
    "data_formats": "vlm.data.formats:READERS",
    "preprocessing": "vlm.data.image_transforms:PREPROCESSING",
    "objectives": "vlm.training.objectives:OBJECTIVES",
    "tasks": "vlm.evaluation.tasks:TASKS",
}


def registry(kind: str) -> Registry:
    """The registry listed under ``kind`` in :data:`REGISTRIES`."""
    return import_object(REGISTRIES[kind])


def load_run_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), **defaults) -> DictConfig:
    """Load a recipe (:func:`vlm.config.load_config`), import its ``plugins`` and validate it
    against the registries."""
    cfg = load_config(path, overrides, **defaults)
    load_plugins(list(cfg.plugins))
    validate(cfg)
    return cfg


def _lookup(reg: Registry, name: str, where: str):
    try:
        return reg.get(name)
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]}") from None


def check_options(options: Dict[str, Any], options_type, where: str) -> None:
    """``options`` must fit the component's ``Options`` dataclass (None: it takes none)."""
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


def check_kwargs(args: Dict[str, Any], fn, where: str) -> None:
    """Every key of ``args`` must be a parameter of ``fn``."""
    params = inspect.signature(fn).parameters
    for key in args:
        if key not in params:
            raise ConfigError(f"{where}.{key}: not an argument of {fn.__name__}{closest(key, params)}")


def check_feature_cache(stage, connector_cls, objective_cls, where: str) -> None:
    """A stage may train from cached features only if nothing it runs needs the encoder live."""
    if Train(stage.train.vision) is not Train.frozen:
        raise ConfigError(f"{where}: needs train.vision: frozen (cached features would go stale as "
                          f"the encoder trains); got '{Train(stage.train.vision).value}'")
    conflict = connector_cls.feature_cache_conflict()
    if conflict:
        raise ConfigError(f"{where}: connector {connector_cls.__name__} {conflict}")
    if objective_cls.needs_pixels:
        raise ConfigError(f"{where}: objective '{stage.objective}' reads the images itself")


def check_data(data, where: str) -> None:
    """A dataset entry: a registered reader and that reader's arguments."""
    reader = _lookup(registry("data_formats"), data.format, f"{where}.format")
    check_kwargs(data.args, reader, f"{where}.args")
    if data.repeat < 1:
        raise ConfigError(f"{where}.repeat: must be at least 1, got {data.repeat}")


def check_model(model) -> None:
    """The model section: encoder, connector (and their pairing), template and LLM."""
    encoders, connectors = registry("vision_encoders"), registry("connectors")
    encoder_cls = _lookup(encoders, model.vision.name, "model.vision.name")
    check_options(model.vision.options, encoder_cls.Options, "model.vision.options")
    encoder_cls.check_arch(dict(model.vision.arch), "model.vision.arch")
    if model.vision.preprocess is not None:
        _lookup(registry("preprocessing"), model.vision.preprocess, "model.vision.preprocess")
    connector_cls = _lookup(connectors, model.connector.name, "model.connector.name")
    check_options(model.connector.options, connector_cls.Options, "model.connector.options")
    connector_cls.check_options(dict(model.connector.options), "model.connector.options")
    required = connector_cls.requires_vision
    if required is not None and not issubclass(encoder_cls, required):
        needed = [n for n in encoders.names() if issubclass(encoders.get(n), required)]
        raise ConfigError(f"model.connector.name: connector '{model.connector.name}' runs inside a "
                          f"{' / '.join(repr(n) for n in needed)} vision encoder; model.vision.name is "
                          f"'{model.vision.name}'")
    if model.template != "tokenizer":
        _lookup(registry("templates"), model.template, "model.template")
    if model.llm.name_or_path is None and "model_type" not in model.llm.arch:
        raise ConfigError("model.llm: give name_or_path, or arch with a model_type")
    from vlm.modeling.dtypes import DTYPES

    if model.llm.dtype not in DTYPES:
        raise ConfigError(f"model.llm.dtype: unknown dtype '{model.llm.dtype}'{closest(model.llm.dtype, DTYPES)}; "
                          f"known: {', '.join(sorted(DTYPES))}")


def check_stage(stage, connector_cls, where: str) -> None:
    """One training stage: template, data, objective (and its own checks), feature cache."""
    if stage.template is not None and stage.template != "tokenizer":
        _lookup(registry("templates"), stage.template, f"{where}.template")
    if not stage.data:
        raise ConfigError(f"{where}.data: a stage needs at least one dataset")
    for i, data in enumerate(stage.data):
        check_data(data, f"{where}.data.{i}")
    objective = _lookup(registry("objectives"), stage.objective, f"{where}.objective")
    objective.check_stage(stage, where)
    if any(getattr(stage.train, c) == Train.lora for c in ("vision", "connector")):
        raise ConfigError(f"{where}.train: LoRA is supported for the llm only")
    if stage.feature_cache:
        check_feature_cache(stage, connector_cls, objective, f"{where}.feature_cache")
    if stage.packing and not objective.supports_packing:
        raise ConfigError(f"{where}.packing: objective '{stage.objective}' reads padded batches; "
                          "packing needs an objective that supports it (e.g. 'lm')")
    if stage.strategy not in STRATEGY_NAMES:
        raise ConfigError(f"{where}.strategy: unknown strategy '{stage.strategy}'"
                          f"{closest(stage.strategy, STRATEGY_NAMES)}; known: {', '.join(STRATEGY_NAMES)}")


def check_eval(ev, where: str) -> None:
    """One evaluation: a registered task, its data (format defaulting to the task's), its checks."""
    task = _lookup(registry("tasks"), ev.task, f"{where}.task")
    if ev.data.format is None:
        ev.data.format = task.data_format
    if ev.data.format != task.data_format:
        raise ConfigError(f"{where}.data.format: task '{ev.task}' reads '{task.data_format}' data")
    check_data(ev.data, f"{where}.data")
    if ev.data.repeat != 1:
        raise ConfigError(f"{where}.data.repeat: an evaluation reads each sample once, got {ev.data.repeat}")
    task.check(ev, where)


def validate(cfg: DictConfig) -> None:
    """Check registry names, component options and reader arguments, without building anything.
    An eval's ``data.format`` left unset is filled with its task's."""
    check_model(cfg.model)
    connector_cls = registry("connectors").get(cfg.model.connector.name)
    if cfg.prepare.tokenizer is not None:
        for i, data in enumerate(cfg.prepare.tokenizer.data):
            check_data(data, f"prepare.tokenizer.data.{i}")
    for name, stage in cfg.stages.items():
        check_stage(stage, connector_cls, f"stages.{name}")
    for name, ev in cfg.evals.items():
        check_eval(ev, f"evals.{name}")


def catalog() -> Dict[str, List[str]]:
    """Every registry's exact names, by kind (plugins from entry points included)."""
    load_entry_point_plugins()
    return {kind: registry(kind).names() for kind in REGISTRIES}
