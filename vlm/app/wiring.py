"""The composition root: the one list of registries and a run config's checks against them.

``vlm.config`` is pure data; this module knows the components. :func:`load_run_config` is the one
entry point that loads a recipe *and* validates it (every command, benchmark and test uses it);
:func:`validate` checks registry names, component options and reader arguments without building
anything, importing only the components the config names. Every kind is checked the same way
(:func:`check_component`): the name in its registry, the section's ``options`` against the
component's ``Options``, then the component's own ``check(cfg, where)`` (the protocol of
:class:`vlm.core.registry.Component`); what spans two components (the connector's encoder, the
feature cache) is checked here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from vlm.config import LLM_KINDS, Train, _one_hint, _schema_fields, load_config
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
    "strategies": "vlm.training.strategies:STRATEGIES",
    "trackers": "vlm.training.trackers:TRACKERS",
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


def check_component(kind: str, name: str, cfg, where: str, name_key: str,
                    options: Optional[Dict[str, Any]] = None):
    """The one check of every kind of component: ``name`` must be registered in ``kind``
    (ConfigError at ``name_key``, with the closest name), ``options`` (the section's ``options``,
    for a kind whose section has them) must fit the component's ``Options``, and the component
    checks its own rules of ``cfg``, the config section at ``where`` that names it
    (``check(cfg, where)``). Returns the component."""
    component = _lookup(registry(kind), name, name_key)
    if options is not None:
        check_options(options, component.Options, f"{where}.options")
    component.check(cfg, where)
    return component


def check_data(data, where: str) -> None:
    """A dataset entry: a registered reader (which checks its arguments) and ``repeat``."""
    check_component("data_formats", data.format, data, where, f"{where}.format")
    if data.repeat < 1:
        raise ConfigError(f"{where}.repeat: must be at least 1, got {data.repeat}")


def check_model(model):
    """The model section: encoder, connector (and their pairing), template and LLM. Returns the
    connector class (the stages' feature-cache rule reads it)."""
    vision, connector = model.vision, model.connector
    encoder_cls = check_component("vision_encoders", vision.name, vision, "model.vision", "model.vision.name",
                                  vision.options)
    if vision.preprocess is not None:
        check_component("preprocessing", vision.preprocess, vision, "model.vision", "model.vision.preprocess")
    connector_cls = check_component("connectors", connector.name, connector, "model.connector",
                                    "model.connector.name", connector.options)
    required = connector_cls.requires_vision
    if required is not None and not issubclass(encoder_cls, required):
        encoders = registry("vision_encoders")
        needed = [n for n in encoders.names() if issubclass(encoders.get(n), required)]
        raise ConfigError(f"model.connector.name: connector '{connector.name}' runs inside a "
                          f"{' / '.join(repr(n) for n in needed)} vision encoder; model.vision.name is "
                          f"'{vision.name}'")
    check_component("templates", model.template, model, "model", "model.template")
    check_visual_layout(model)
    if model.llm.name_or_path is None and "model_type" not in model.llm.arch:
        raise ConfigError("model.llm: give name_or_path, or arch with a model_type")
    from vlm.modeling.dtypes import DTYPES

    if model.llm.dtype not in DTYPES:
        raise ConfigError(f"model.llm.dtype: unknown dtype '{model.llm.dtype}'{closest(model.llm.dtype, DTYPES)}; "
                          f"known: {', '.join(sorted(DTYPES))}")
    if model.llm.kind not in LLM_KINDS:
        raise ConfigError(f"model.llm.kind: unknown kind '{model.llm.kind}'{closest(model.llm.kind, LLM_KINDS)}; "
                          f"known: {', '.join(LLM_KINDS)}")
    return connector_cls


def check_stage(stage, connector_cls, where: str) -> None:
    """One training stage: template, data, objective, strategy (each with its own checks), and
    the feature cache (the one rule combining the connector's and the objective's declarations)."""
    from vlm.data.feature_cache import feature_cache_refusal

    if stage.template is not None:
        check_component("templates", stage.template, stage, where, f"{where}.template")
    if not stage.data:
        raise ConfigError(f"{where}.data: a stage needs at least one dataset")
    for i, data in enumerate(stage.data):
        check_data(data, f"{where}.data.{i}")
    check_options(dict(stage.objective_options), _lookup(registry("objectives"), stage.objective, f"{where}.objective")
                  .Options, f"{where}.objective_options")
    objective = check_component("objectives", stage.objective, stage, where, f"{where}.objective")
    if any(getattr(stage.train, c) == Train.lora for c in ("vision", "connector")):
        raise ConfigError(f"{where}.train: LoRA is supported for the llm only")
    if stage.feature_cache:
        refusal = feature_cache_refusal(connector_cls, objective, stage.train.vision, stage.objective)
        if refusal:
            raise ConfigError(f"{where}.feature_cache: {refusal}")
    check_component("strategies", stage.strategy, stage, where, f"{where}.strategy")


def check_visual_layout(model) -> None:
    """``model.vision.tiling.multi_image`` and ``model.video.newline`` (it needs the tiles'
    newline), at load rather than when the model is built."""
    from vlm.data.anyres import check_multi_image
    from vlm.modeling.tiling import check_video_newline

    tiling = model.vision.tiling
    check_multi_image(tiling.multi_image)
    if model.video.newline:
        check_video_newline(bool(tiling.enabled and tiling.newline))


def check_tiled_stage(stage, where: str) -> None:
    """With ``model.vision.tiling`` an image is several tiles: ConfigError for a stage that
    needs one pixel tensor or one cached feature map per image."""
    objective = registry("objectives").get(stage.objective)
    if objective.needs_pixels and not objective.reads_tiles:
        raise ConfigError(f"{where}.objective: '{stage.objective}' reads one pixel tensor per image; with "
                          "model.vision.tiling each image is several tiles (train it in an untiled recipe)")
    if stage.feature_cache:
        raise ConfigError(f"{where}.feature_cache: cached features are one encoder pass per image; with "
                          "model.vision.tiling each image is several tiles")


def check_eval(ev, where: str) -> None:
    """One evaluation: a registered task (and its checks), its data (format defaulting to the
    task's)."""
    task = check_component("tasks", ev.task, ev, where, f"{where}.task")
    if ev.data.format is None:
        ev.data.format = task.data_format
    if ev.data.format != task.data_format:
        raise ConfigError(f"{where}.data.format: task '{ev.task}' reads '{task.data_format}' data")
    check_data(ev.data, f"{where}.data")
    if ev.data.repeat != 1:
        raise ConfigError(f"{where}.data.repeat: an evaluation reads each sample once, got {ev.data.repeat}")


def validate(cfg: DictConfig) -> None:
    """Check registry names, component options and reader arguments, without building anything.
    An eval's ``data.format`` left unset is filled with its task's."""
    connector_cls = check_model(cfg.model)
    if cfg.prepare.tokenizer is not None:
        for i, data in enumerate(cfg.prepare.tokenizer.data):
            check_data(data, f"prepare.tokenizer.data.{i}")
    for name, stage in cfg.stages.items():
        check_stage(stage, connector_cls, f"stages.{name}")
        if cfg.model.vision.tiling.enabled:
            check_tiled_stage(stage, f"stages.{name}")
    for name, ev in cfg.evals.items():
        check_eval(ev, f"evals.{name}")
    for name, stage in cfg.stages.items():
        if stage.generate_pairs is not None:
            check_generate_pairs(cfg, stage, f"stages.{name}.generate_pairs")
    check_report_to(cfg)


def check_generate_pairs(cfg: DictConfig, stage, where: str) -> None:
    """A stage's ``generate_pairs`` block: ``out`` given, a checkpoint (its own or the stage's
    ``init_from``), ``eval`` an entry of ``evals`` and ``judge`` a registered judge."""
    from vlm.app.prefs import check_pair_sources, pairs_checkpoint

    if not stage.generate_pairs.out:
        raise ConfigError(f"{where}.out: required (the pairs JSON to write)")
    if not pairs_checkpoint(stage):
        raise ConfigError(f"{where}.checkpoint: required when the stage has no init_from")
    check_pair_sources(cfg, stage.generate_pairs.eval, stage.generate_pairs.judge, f"{where}.eval",
                       f"{where}.judge")


def check_report_to(cfg: DictConfig) -> None:
    """``report_to``: registered tracker names (each checks that its package is installed)."""
    for i, name in enumerate(cfg.report_to):
        check_component("trackers", name, cfg, f"report_to.{i}", f"report_to.{i}")


def catalog() -> Dict[str, List[str]]:
    """Every registry's exact names, by kind (plugins from entry points included)."""
    load_entry_point_plugins()
    return {kind: registry(kind).names() for kind in REGISTRIES}
