"""The check pass before a run trains: every rule knowable from the config, one ConfigError each."""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Set, Tuple

from omegaconf import DictConfig

from vlm.app.wiring import registry
from vlm.checkpoint.manifest import (
    has_pretrained_source,
    read_manifest,
    unsaveable_lora,
)
from vlm.checkpoint.pretrained import require_stage_output
from vlm.config import COMPONENTS, Train, train_modes
from vlm.core.errors import ConfigError


@dataclass(frozen=True)
class Plan:
    """What a launch will do: the run config, the stages it trains in order, the evaluations it
    runs (after training, or during it) and the folders its ``prepare`` steps (and its stages'
    ``generate_pairs``) write."""

    cfg: DictConfig
    stages: Tuple[str, ...]
    evals: Tuple[str, ...]
    prepared: Tuple[Path, ...]

    @classmethod
    def of(cls, cfg: DictConfig, stages: Sequence[str], whole_recipe: bool) -> "Plan":
        """The plan of ``vlm run`` (``whole_recipe``: its prepare steps, stages and evaluations)
        or of ``vlm train`` (the stages, and the evaluations they run during training)."""
        evals = list(cfg.evals) if whole_recipe else []
        for name in stages:
            stage = cfg.stages[name]
            if stage.eval_every:
                evals += [e for e in stage.evals if e not in evals]
        # every prepare step (shapes, extra_shapes, scenes, multi, tokenizer) writes its files under its ``out``
        steps = ()
        if whole_recipe:
            steps = tuple(cfg.prepare[name] for name in cfg.prepare if name != "extra_shapes")
            steps += tuple(cfg.prepare.extra_shapes)
        steps += tuple(cfg.stages[name].generate_pairs for name in stages)  # pairs a stage writes first
        prepared = tuple(Path(step.out).absolute() for step in steps if step is not None)
        return cls(cfg, tuple(stages), tuple(evals), prepared)


Rule = Callable[[Plan], None]
RULES: Dict[str, Rule] = {}


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a check under ``name`` (run in registration order by :func:`preflight`)."""
    def register(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn
    return register


def preflight(cfg: DictConfig, stages: Sequence[str], whole_recipe: bool) -> None:
    """Run every rule over the plan (:meth:`Plan.of`) before anything is written or trained: the
    first broken rule raises its ConfigError (``vlm run`` / ``vlm train`` exit 2 with its line)."""
    plan = Plan.of(cfg, stages, whole_recipe)
    for check in RULES.values():
        check(plan)


def _stage_output(cfg: DictConfig, name: str) -> Path:
    return (Path(cfg.out_dir) / name / "final").absolute()


@rule("out_dir")
def out_dir_is_writable(plan: Plan) -> None:
    """``out_dir`` is a folder (or can become one) that this user can write."""
    out = Path(plan.cfg.out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out}: exists and is not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"out_dir {out}: {existing} is not a folder this user can write")


@rule("init_from")
def init_from_exists(plan: Plan) -> None:
    """A stage's ``init_from`` is a complete stage output now, or the one an earlier stage of this
    launch writes."""
    written: Set[Path] = set()
    for name in plan.stages:
        init_from = plan.cfg.stages[name].init_from
        if init_from and Path(init_from).absolute() not in written:
            try:
                require_stage_output(init_from, f"stages.{name}.init_from:")
            except Exception as exc:  # CheckpointError: the same words, as a config error
                launched = ", ".join(plan.stages)
                raise ConfigError(f"{exc} (no stage of this launch writes it; stages: {launched})") from None
        written.add(_stage_output(plan.cfg, name))


def _planned_components(plan: Plan) -> Dict[str, Set[str]]:
    """Per stage of the plan, the components its ``final`` will hold weights for, as
    ``save_model_state`` writes them: those its ``init_from`` holds (an existing output's
    manifest, or an earlier stage's plan), those it trains fully, and those with no pretrained
    source (saved as initialised)."""
    by_output: Dict[Path, Set[str]] = {}
    planned: Dict[str, Set[str]] = {}
    for name in plan.stages:
        stage = plan.cfg.stages[name]
        prior: Set[str] = set()
        if stage.init_from:
            path = Path(stage.init_from).absolute()
            prior = by_output[path] if path in by_output else {c for c, e in read_manifest(path).items() if e}
        modes = train_modes(stage.train)
        planned[name] = prior | {c for c in COMPONENTS if Train(modes[c]) is Train.full
                                 or not has_pretrained_source(plan.cfg.model, c)}
        by_output[_stage_output(plan.cfg, name)] = planned[name]
    return planned


@rule("lora_saveable")
def lora_can_be_saved(plan: Plan) -> None:
    """LoRA only on a component with weights under it (pretrained, or trained by a stage before):
    otherwise the save after the last step would fail."""
    planned = _planned_components(plan)
    for name in plan.stages:
        stage = plan.cfg.stages[name]
        prior = None
        if stage.init_from:
            path = Path(stage.init_from).absolute()
            earlier = [n for n in plan.stages if _stage_output(plan.cfg, n) == path]
            components = planned[earlier[0]] if earlier else {c for c, e in read_manifest(path).items() if e}
            prior = {c: [{}] for c in components}
        refusal = unsaveable_lora(train_modes(stage.train), plan.cfg.model, prior)
        if refusal:
            raise ConfigError(f"stages.{name}.train: {refusal}")


def path_arguments(fmt: str, args) -> List[Tuple[str, str]]:
    """The ``(argument, path)`` pairs of a dataset entry's ``args`` that its reader declares as
    paths (annotated ``os.PathLike``, alone or in a Union), in the reader's parameter order."""
    reader = registry("data_formats").get(fmt)
    hints = typing.get_type_hints(getattr(reader, "fn", reader))
    return [(key, str(args[key])) for key, hint in hints.items() if _declares_path(hint) and args.get(key) is not None]


def _declares_path(hint) -> bool:
    members = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    return any(m is os.PathLike or typing.get_origin(m) is os.PathLike for m in members)


@rule("data_files")
def data_files_exist(plan: Plan) -> None:
    """Every path a dataset entry names (of every stage trained and every evaluation run) exists
    or is written by the plan's prepare steps: a missing file of the last stage or of the
    evaluation stops the run before the first stage."""
    entries = [(f"stages.{n}.data.{i}", d) for n in plan.stages for i, d in enumerate(plan.cfg.stages[n].data)]
    entries += [(f"evals.{n}.data", plan.cfg.evals[n].data) for n in plan.evals]
    for where, data in entries:
        for key, path in path_arguments(data.format, data.args):
            target = Path(path).absolute()
            if not target.exists() and not any(target.is_relative_to(p) for p in plan.prepared):
                raise ConfigError(f"{where}.args.{key}: {path}: no such file or folder")
