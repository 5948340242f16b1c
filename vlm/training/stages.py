"""Apply a stage: set what trains per component, add LoRA, build optimizer parameter groups."""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping, Optional

from vlm.config import COMPONENTS, Optimization, Train, WhatTrains
from vlm.core.errors import ConfigError
from vlm.modeling.llm import add_lora
from vlm.modeling.vlm import VisionLanguageModel
from vlm.training.objectives import OBJECTIVES

logger = logging.getLogger(__name__)

def apply_stage(model: VisionLanguageModel, trains: WhatTrains, objective: Optional[type] = None) -> Dict[str, int]:
    """Tell the connector the stage begins (``Connector.begin_stage``), freeze / unfreeze /
    LoRA-wrap each component as ``trains`` says, then freeze what the stage's objective declares
    it never reads (``Objective.frozen_parameters``; ``objective``: the stage's objective class
    when the caller has it, else looked up by name).

    Returns (and logs) the trainable parameter count per component: what will train.
    """
    objective = objective if objective is not None else OBJECTIVES.get(trains.objective)
    model.connector.begin_stage(objective.trains_matching)
    for component in COMPONENTS:
        mode = trains.modes[component]
        module = getattr(model, component)
        if mode is Train.lora:
            module.requires_grad_(False)
            setattr(model, component, add_lora(module, trains.lora))  # adapters are trainable
        else:
            module.requires_grad_(mode is Train.full)
    for param in objective.frozen_parameters(model):
        param.requires_grad_(False)
    counts = trainable_counts(model)
    logger.info(
        "trainable parameters: %s",
        ", ".join(f"{c}={counts[c]:,} ({trains.modes[c].value})" for c in COMPONENTS),
    )
    return counts


def trainable_counts(model: VisionLanguageModel) -> Dict[str, int]:
    """Number of trainable parameters per component."""
    return {
        c: sum(p.numel() for p in getattr(model, c).parameters() if p.requires_grad) for c in COMPONENTS
    }


def trainable_names(model: VisionLanguageModel) -> Dict[str, List[str]]:
    """Names of trainable parameters per component (relative to the component)."""
    return {
        c: [n for n, p in getattr(model, c).named_parameters() if p.requires_grad] for c in COMPONENTS
    }


def set_train_modes(model: VisionLanguageModel, modes: Mapping[str, Train]) -> None:
    """``train()`` for components that train, ``eval()`` for frozen ones (no dropout there);
    ``modes``: each component's train mode (``WhatTrains.modes``)."""
    for component in COMPONENTS:
        getattr(model, component).train(Train(modes[component]) is not Train.frozen)


def parameter_groups(model: VisionLanguageModel, optimization: Optimization) -> List[dict]:
    """AdamW groups per component: its own learning rate; no weight decay on biases and norms."""
    groups = []
    for component in COMPONENTS:
        lr = optimization.lr(component)
        decay, no_decay = [], []
        for name, param in getattr(model, component).named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        for params, wd, suffix in ((decay, optimization.weight_decay, ""), (no_decay, 0.0, "_no_decay")):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": component + suffix})
    if not groups:
        raise ConfigError("this stage trains nothing: every component is frozen")
    return groups
