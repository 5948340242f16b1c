"""Stage application: exactly which parameters train per component, LoRA placement, optimizer groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm.config import (
    LearningRates,
    LoraConfig,
    Optimization,
    StageConfig,
    TrainModes,
    WhatTrains,
    train_modes,
)
from vlm.training.stages import (
    apply_stage,
    parameter_groups,
    set_train_modes,
    trainable_names,
)

CONNECTOR_PARAMS = ["proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"]
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stage(vision="frozen", connector="full", llm="frozen", **kwargs) -> StageConfig:
    return StageConfig(train=TrainModes(vision=vision, connector=connector, llm=llm), **kwargs)


def test_align_trains_only_the_connector(tiny_model):
    counts = apply_stage(tiny_model, WhatTrains.of(stage()))
    names = trainable_names(tiny_model)
    assert sorted(names["connector"]) == sorted(CONNECTOR_PARAMS)
    assert names["vision"] == [] and names["llm"] == []
    assert counts["connector"] == sum(p.numel() for p in tiny_model.connector.parameters())
    assert counts["vision"] == counts["llm"] == 0


def test_instruct_with_lora_puts_adapters_on_every_llm_linear_except_lm_head(tiny_model):
    linear_names = {n for n, m in tiny_model.llm.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in linear_names
    apply_stage(tiny_model, WhatTrains.of(stage(llm="lora", lora=LoraConfig(r=4, alpha=8, dropout=0.1))))
    names = trainable_names(tiny_model)
    assert sorted(names["connector"]) == sorted(CONNECTOR_PARAMS)
    assert names["vision"] == []
    assert names["llm"], "LoRA must add trainable adapters"
    assert all(".lora_A." in n or ".lora_B." in n for n in names["llm"]), names["llm"]
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in names["llm"]}
    assert adapted == linear_names - {"lm_head"}
    for layer in range(tiny_model.llm.config.num_hidden_layers):
        for proj in LLAMA_LINEARS:
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            module = f"model.layers.{layer}.{block}.{proj}"
            assert {f"{module}.lora_A.default.weight", f"{module}.lora_B.default.weight"} <= {
                n.removeprefix("base_model.model.") for n in names["llm"]}
    assert not any("lm_head" in n for n, _ in tiny_model.llm.named_parameters() if "lora" in n)
    # every original weight, lm_head and embeddings included, stays frozen
    frozen = [p for n, p in tiny_model.llm.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_full_finetune_trains_every_llm_parameter(tiny_model):
    apply_stage(tiny_model, WhatTrains.of(stage(llm="full")))
    names = trainable_names(tiny_model)
    assert sorted(names["llm"]) == sorted(n for n, _ in tiny_model.llm.named_parameters())
    assert names["vision"] == []


def test_vision_full_trains_every_kept_vision_parameter_and_each_gets_a_gradient(tiny_model, tokenizer):
    apply_stage(tiny_model, WhatTrains.of(stage(vision="full", connector="frozen", llm="frozen")))
    names = trainable_names(tiny_model)
    assert sorted(names["vision"]) == sorted(n for n, _ in tiny_model.vision.named_parameters())
    assert names["connector"] == [] and names["llm"] == []
    # no trainable parameter may be left out of the graph (DDP would fail on it)
    k = tiny_model.num_image_tokens
    ids = torch.tensor([[tokenizer.bos_token_id] + [tiny_model.image_token_id] * k + [10, 11, 12]])
    out = tiny_model(ids, pixel_values=torch.randn(1, 3, 32, 32), labels=ids)
    out.loss.backward()
    missing = [n for n, p in tiny_model.vision.named_parameters() if p.grad is None]
    assert missing == []


def test_set_train_modes_puts_frozen_components_in_eval_mode(tiny_model):
    s = stage(llm="lora")
    apply_stage(tiny_model, WhatTrains.of(s))
    tiny_model.train()
    set_train_modes(tiny_model, train_modes(s.train))
    assert not tiny_model.vision.training
    assert tiny_model.connector.training and tiny_model.llm.training


def test_parameter_groups_use_component_learning_rates_and_no_decay_on_1d_params(tiny_model):
    s = stage(vision="full", connector="full", llm="full", learning_rate=1e-3, weight_decay=0.1,
              lr=LearningRates(connector=2e-3, llm=5e-5))
    apply_stage(tiny_model, WhatTrains.of(s))
    groups = parameter_groups(tiny_model, Optimization.of(s))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"vision", "vision_no_decay", "connector", "connector_no_decay", "llm", "llm_no_decay"}
    expected_lr = {"vision": 1e-3, "connector": 2e-3, "llm": 5e-5}
    for name, group in by_name.items():
        component = name.removesuffix("_no_decay")
        assert group["lr"] == expected_lr[component]
        if name.endswith("_no_decay"):
            assert group["weight_decay"] == 0.0 and all(p.ndim == 1 for p in group["params"])
        else:
            assert group["weight_decay"] == 0.1 and all(p.ndim >= 2 for p in group["params"])
        owned = {id(p) for p in getattr(tiny_model, component).parameters()}
        assert all(id(p) in owned for p in group["params"])
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter appears in two groups"
    assert set(grouped) == {id(p) for p in tiny_model.parameters() if p.requires_grad}
    biases = {id(p) for p in by_name["connector_no_decay"]["params"]}
    assert biases == {id(tiny_model.connector.proj[0].bias), id(tiny_model.connector.proj[2].bias)}


def test_parameter_groups_skip_frozen_components(tiny_model):
    s = stage(llm="lora")
    apply_stage(tiny_model, WhatTrains.of(s))
    names = {g["name"] for g in parameter_groups(tiny_model, Optimization.of(s))}
    assert names == {"connector", "connector_no_decay", "llm"}  # LoRA matrices are 2-D


def test_stage_that_freezes_everything_raises(tiny_model):
    s = stage(vision="frozen", connector="frozen", llm="frozen")
    counts = apply_stage(tiny_model, WhatTrains.of(s))
    assert sum(counts.values()) == 0
    with pytest.raises(ValueError, match="trains nothing"):
        parameter_groups(tiny_model, Optimization.of(s))


def test_apply_stage_accepts_a_structured_omegaconf_stage(tiny_model):
    from omegaconf import OmegaConf

    s = OmegaConf.merge(OmegaConf.structured(StageConfig), {"train": {"llm": "full", "connector": "frozen"}})
    apply_stage(tiny_model, WhatTrains.of(s))
    names = trainable_names(tiny_model)
    assert names["connector"] == [] and len(names["llm"]) == len(list(tiny_model.llm.parameters()))


@pytest.mark.parametrize("objective", ["lm", "qformer_stage1"])
def test_logged_counts_are_what_trains_once_the_objective_is_built(tokenizer_dir, tokenizer, objective, caplog):
    """A Q-Former stage freezes what its objective never reads (``Objective.frozen_parameters``)
    before counting, so the logged and returned counts equal the parameters with requires_grad
    after the objective is built."""
    from conftest import build_tiny_model, tiny_model_config

    from vlm.training.objectives import build_objective

    options = dict(num_queries=4, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, embed_dim=16)
    cfg = tiny_model_config(tokenizer_dir, **{"connector.name": "qformer", "connector.options": options})
    model = build_tiny_model(cfg, tokenizer)
    everything = sum(p.numel() for p in model.connector.parameters())
    with caplog.at_level("INFO", logger="vlm.training.stages"):
        counts = apply_stage(model, WhatTrains.of(stage(objective=objective)))
    build_objective(objective, model, tokenizer)
    really = {c: sum(p.numel() for p in getattr(model, c).parameters() if p.requires_grad)
              for c in ("vision", "connector", "llm")}
    assert counts == really
    assert 0 < counts["connector"] < everything  # some of the Q-Former is frozen for either objective
    assert f"connector={counts['connector']:,} (full)" in caplog.text
    frozen = {id(p) for p in model.connector.parameters() if not p.requires_grad}
    if objective == "lm":
        assert frozen == {id(p) for p in model.connector.llm_unused_parameters()}
    else:
        assert frozen == {id(p) for p in model.connector.proj.parameters()}


def test_each_consumer_reads_only_its_part_of_the_stage():
    from omegaconf import OmegaConf

    from vlm.config import (
        NonFinitePolicy,
        OnNonFinite,
        Precision,
        Schedule,
        TrainerSettings,
    )

    s = OmegaConf.merge(OmegaConf.structured(StageConfig), {
        "train": {"llm": "lora"}, "lora": {"r": 4}, "learning_rate": 2e-3, "lr": {"llm": 1e-4},
        "weight_decay": 0.1, "max_grad_norm": 0.5, "batch_size": 3, "grad_accum": 2, "max_steps": 7,
        "log_every": 2, "save_every": 5, "on_nonfinite": "skip", "max_nonfinite_skips": 4,
        "precision": "bf16", "compile": True, "num_workers": 1, "training_attention": True,
        "frozen_weight_cast": False})
    settings = TrainerSettings.of(s)
    assert settings.trains == WhatTrains({"vision": "frozen", "connector": "full", "llm": "lora"},
                                         LoraConfig(r=4), "lm")
    assert settings.optimization.lr("llm") == 1e-4 and settings.optimization.lr("vision") == 2e-3
    assert (settings.optimization.weight_decay, settings.optimization.max_grad_norm) == (0.1, 0.5)
    assert settings.schedule == Schedule(batch_size=3, grad_accum=2, epochs=1.0, max_steps=7, warmup_ratio=0.03,
                                         min_lr_ratio=0.0, seed=42, log_every=2, save_every=5)
    assert settings.nonfinite == NonFinitePolicy(OnNonFinite.skip, 4)
    assert (settings.precision, settings.compile, settings.num_workers) == (Precision.bf16, True, 1)
    assert (settings.training_attention, settings.frozen_weight_cast) == (True, False)
    s.precision = "auto"  # the trainer runs one concrete precision: auto is resolved before it
    with pytest.raises(ValueError, match="precision 'auto' reached the trainer unresolved"):
        TrainerSettings.of(s)
