"""The component contract: every registered name of every registry in
``vlm.app.wiring.REGISTRIES`` (strategies included) follows ``vlm.core.registry.Component``
(``Options``, ``build(options, ctx)``, ``check(cfg, where)``), builds from its defaults on a tiny
config (nothing is downloaded) and gives the shapes its kind declares:

- vision encoder: ``forward`` on tiny images gives ``(B, num_patches, embed_dim)``;
- connector: ``num_tokens`` and its visual tokens ``(B, K, llm_dim)``;
- template: trainable / untrainable segments of a small conversation;
- image transform: ``(3, S, S)``;
- objective: builds for a tiny model, has ``frozen_parameters`` and ``check``;
- strategy: builds for a stage's distribution settings, checks its config and the machine;
- dataset reader / evaluation task: ``check`` raises a ConfigError naming ``where`` for a bad
  argument.

Every registered name must have a tiny case here: a new component fails the completeness test
until one is added.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest
import torch
from conftest import VISION_ARCH, build_tiny_model, tiny_model_config
from omegaconf import OmegaConf
from PIL import Image
from test_beit3 import ARCH as BEIT3_ARCH
from test_qformer import SMALL as QFORMER_SMALL
from test_siglip import SIGLIP2_ARCH, SIGLIP_ARCH
from test_vision import OPEN_CLIP_ARCH

from vlm.app.wiring import REGISTRIES, check_component, registry
from vlm.config import (
    ConfigError,
    ConnectorConfig,
    DataConfig,
    EvalConfig,
    StageConfig,
    Train,
    VisionConfig,
)
from vlm.core.registry import Component, Registry, missing_protocol
from vlm.data.feature_cache import feature_cache_refusal
from vlm.data.image_transforms import CLIP_MEAN, CLIP_STD, TransformContext
from vlm.data.templates import Segment, TemplateContext
from vlm.data.types import Turn
from vlm.modeling.connectors import BuildContext
from vlm.modeling.vision import EncoderContext
from vlm.training.objectives import Objective, ObjectiveContext
from vlm.training.strategies import DistributionSettings, Strategy

S, B, LLM_DIM = 32, 2, 48
# tests/test_hf_blip2_export.py's BLIP2_VISION (that module pulls in the interop tests)
BLIP2_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=S, patch_size=8)

# name -> (options, arch): tiny, randomly initialised backbones
ENCODERS = {
    "hf_clip": ({}, VISION_ARCH),
    "open_clip": ({}, OPEN_CLIP_ARCH),
    "beit3": ({}, BEIT3_ARCH),
    "hf_blip2_vision": ({}, BLIP2_VISION),
    "hf_siglip": ({}, SIGLIP_ARCH),
    "hf_siglip2": ({}, SIGLIP2_ARCH),
    "timm_vit": ({"model_name": "vit_base_patch16_224"},
                 dict(img_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=4)),
    "timm_cnn": ({"model_name": "resnet10t", "image_size": S}, {}),
}
# name -> options: the defaults, except for sizes that default to real models' (qformer: BERT-base)
CONNECTORS = {
    "linear": {},
    "mlp2x_gelu": {},
    "question_aware_mlp": {},
    "qformer": QFORMER_SMALL,
    "beit3_query": {"num_queries": 4},
}
TEMPLATES = ["plain", "vicuna_v1", "chatml", "tokenizer", "blip2_qa", "instructblip"]
TRANSFORMS = ["resize", "pad", "resize_center_crop"]
# name -> (model overrides, train modes the objective accepts, train modes it refuses or None)
OBJECTIVES = {
    "lm": ({}, {}, None),
    "caption_bow": ({}, {"vision": "full", "connector": "frozen"}, {}),
    "answer_words": ({}, {"vision": "full", "connector": "frozen"}, {}),
    "qformer_stage1": ({"connector.name": "qformer", "connector.options": QFORMER_SMALL}, {}, {"llm": "full"}),
    "prefix_lm": ({"llm.kind": "seq2seq", "llm.arch": dict(model_type="t5", d_model=48, d_kv=12, d_ff=96, num_layers=1,
                                                            num_heads=4)}, {}, None),
    "dpo": ({}, {"connector": "frozen", "llm": "lora"}, {"llm": "full"}),
    "simpo": ({}, {}, None),
}
STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
READERS = ["llava_json", "jsonl", "coco_captions", "vqav2", "pope", "preference_json", "webdataset", "hf_dataset"]
# name -> a data.args that is valid for the task's check
TASKS = {"caption": {}, "retrieval": {}, "vqa": {"annotations_path": "annotations.json"},
         "pope": {"annotations": "instances.json"}}
TRACKERS = ["jsonl", "tensorboard", "wandb", "mlflow"]

CASES = {"vision_encoders": ENCODERS, "connectors": CONNECTORS, "templates": TEMPLATES,
         "preprocessing": TRANSFORMS, "objectives": OBJECTIVES, "strategies": STRATEGIES,
         "data_formats": READERS, "tasks": TASKS, "trackers": TRACKERS}
EVERY_NAME = [(kind, name) for kind in REGISTRIES for name in registry(kind).names()]


def names(kind):
    return registry(kind).names()


def test_every_registry_has_a_contract_case_for_every_name():
    assert set(CASES) == set(REGISTRIES), "a registry without contract cases in this file"
    for kind, name in EVERY_NAME:
        assert name in CASES[kind], f"{kind} '{name}': add a tiny case to tests/test_components.py"


@pytest.mark.parametrize("kind, name", EVERY_NAME)
def test_every_entry_follows_the_component_protocol(kind, name):
    component = registry(kind).get(name)
    assert isinstance(component, Component) and missing_protocol(component) == []
    assert component.Options is None or dataclasses.is_dataclass(component.Options)
    assert callable(component.build) and callable(component.check)


def test_a_registry_refuses_what_does_not_follow_the_protocol():
    things = Registry("thing")
    with pytest.raises(TypeError, match=r"thing 'bad' .*has no Options, build, check"):
        things.register("bad")(object())
    lazy = Registry("thing", {"bad": "vlm.core.registry:closest"})
    with pytest.raises(TypeError, match="does not follow the component protocol"):
        lazy.get("bad")


# ---------------------------------------------------------------------------------------------
# vision encoders and connectors


def tiny_encoder(name):
    options, arch = ENCODERS[name]
    torch.manual_seed(0)
    cls = registry("vision_encoders").get(name)
    return cls.build(options, EncoderContext(name=name, arch=dict(arch))).eval()


@pytest.mark.parametrize("name", names("vision_encoders"))
def test_an_encoder_builds_from_its_options_and_gives_its_declared_shape(name):
    options, arch = ENCODERS[name]
    cls = registry("vision_encoders").get(name)
    section = OmegaConf.structured(VisionConfig(name=name, options=dict(options), arch=dict(arch)))
    assert check_component("vision_encoders", name, section, "model.vision", "model.vision.name", section.options) is cls
    encoder = tiny_encoder(name)
    assert encoder.cfg.name == name and dict(encoder.cfg.options) == options
    with torch.no_grad():
        features = encoder(torch.randn(B, 3, encoder.image_size, encoder.image_size))
    assert features.shape == (B, encoder.num_patches, encoder.embed_dim)
    assert encoder.image_transform()(Image.new("RGB", (40, 24))).shape == (3, encoder.image_size, encoder.image_size)
    if cls.arch_keys() is not None:  # the backbone's own config fields, checked at load
        with pytest.raises(ConfigError, match=r"^model\.vision\.arch\.bogus_field: unknown architecture field"):
            cls.check(VisionConfig(name=name, arch={**arch, "bogus_field": 1}), "model.vision")


@pytest.mark.parametrize("name", names("connectors"))
def test_a_connector_builds_from_its_options_and_gives_its_declared_tokens(name, tokenizer):
    cls = registry("connectors").get(name)
    encoder = tiny_encoder("beit3" if cls.requires_vision is not None else "hf_clip")
    options = CONNECTORS[name]
    section = OmegaConf.structured(ConnectorConfig(name=name, options=dict(options)))
    assert check_component("connectors", name, section, "model.connector", "model.connector.name",
                           section.options) is cls
    torch.manual_seed(0)
    connector = cls.build(options, BuildContext(encoder.embed_dim, LLM_DIM, tokenizer=tokenizer, vision=encoder)).eval()
    pixels = torch.randn(B, 3, encoder.image_size, encoder.image_size)
    with torch.no_grad():
        tokens = connector.encode_images(encoder, pixels, ["what color is the shape?"] * B)
    assert tokens.shape == (B, connector.num_tokens(encoder.num_patches), LLM_DIM)
    with pytest.raises(ConfigError, match=r"^model\.connector\.options\.bogus_option: "):
        check_component("connectors", name, ConnectorConfig(name=name, options={"bogus_option": 1}),
                        "model.connector", "model.connector.name", {"bogus_option": 1})


# ---------------------------------------------------------------------------------------------
# templates and image transforms


CONVERSATION = [Turn("user", "<image>\nwhat color is the shape?"), Turn("assistant", "red")]


@pytest.mark.parametrize("name", names("templates"))
def test_a_template_renders_a_conversation_into_segments(name, tokenizer):
    if name == "tokenizer":  # the tokenizer's own chat_template: give the tiny one a template
        tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cls = registry("templates").get(name)
    cls.check(OmegaConf.structured(StageConfig(template=name)), "stages.s")
    template = cls.build(None, TemplateContext(tokenizer, None))
    segments = template.segments(CONVERSATION)
    assert segments and all(isinstance(s, Segment) for s in segments)
    assert "".join(s.text for s in segments if s.trainable).strip().startswith("red")
    prompt = template.segments(CONVERSATION[:1], add_generation_prompt=True)
    assert prompt and not any(s.trainable for s in prompt)


@pytest.mark.parametrize("name", names("preprocessing"))
def test_a_transform_gives_a_normalised_square(name):
    transform = registry("preprocessing").get(name).build(None, TransformContext(S, CLIP_MEAN, CLIP_STD))
    pixels = transform(Image.new("RGBA", (40, 24), (255, 0, 0, 128)))
    assert pixels.shape == (3, S, S) and pixels.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# objectives and strategies


def stage_config(**fields):
    train = fields.pop("train", {})
    stage = OmegaConf.structured(StageConfig(**fields))
    for component, mode in train.items():
        stage.train[component] = Train(mode)
    return stage


@pytest.mark.parametrize("name", names("objectives"))
def test_an_objective_builds_for_a_tiny_model_and_checks_its_stage(name, tokenizer_dir, tokenizer):
    overrides, accepted, refused = OBJECTIVES[name]
    cls = registry("objectives").get(name)
    model = build_tiny_model(tiny_model_config(tokenizer_dir, **overrides), tokenizer)
    objective = cls.build(None, ObjectiveContext(model, tokenizer))
    assert isinstance(objective, Objective)
    assert cls.Options is None or dataclasses.is_dataclass(cls.Options)
    frozen = cls.frozen_parameters(model)
    assert all(isinstance(p, torch.nn.Parameter) for p in frozen)
    cls.check(stage_config(objective=name, train=accepted), "stages.s")
    if refused is not None:
        with pytest.raises(ConfigError, match=r"^stages\.s\.train: "):
            cls.check(stage_config(objective=name, train=refused), "stages.s")
    packed = stage_config(objective=name, train=accepted, packing=True)
    if cls.supports_packing:
        cls.check(packed, "stages.s")
    else:
        with pytest.raises(ConfigError, match=rf"^stages\.s\.packing: objective '{name}' reads padded batches"):
            cls.check(packed, "stages.s")


@pytest.mark.parametrize("name", names("strategies"))
def test_a_strategy_builds_for_the_stages_distribution_settings(name):
    cls = registry("strategies").get(name)
    assert cls.Options is None and cls.name == name
    stage = stage_config(strategy=name, grad_accum=1, precision="fp32")  # resolved, as build_stage passes it
    cls.check(stage, "stages.s")
    with pytest.raises(ValueError, match="precision 'auto' reached a strategy unresolved"):
        DistributionSettings.of(stage_config(strategy=name))
    strategy = cls.build(None, DistributionSettings.of(stage))
    assert isinstance(strategy, Strategy) and strategy.settings.grad_accum == 1
    if not name.startswith("zero"):
        strategy.check_available("stages.s")
        return
    with pytest.raises(ConfigError, match=rf"^stages\.s\.grad_accum: strategy '{name}' needs grad_accum 1"):
        cls.check(stage_config(strategy=name, grad_accum=2), "stages.s")
    if torch.cuda.is_available() and importlib.util.find_spec("deepspeed") is not None:
        strategy.check_available("stages.s")  # the machine can run it (its accelerator: tests/test_distributed.py)
    else:
        with pytest.raises(ConfigError, match=rf"^stages\.s\.strategy: '{name}' .*(CUDA|deepspeed)"):
            strategy.check_available("stages.s")


# ---------------------------------------------------------------------------------------------
# dataset readers and evaluation tasks


@pytest.mark.parametrize("name", names("data_formats"))
def test_a_reader_refuses_an_argument_it_does_not_take(name):
    reader = registry("data_formats").get(name)
    first = next(iter(inspect.signature(reader.fn).parameters))  # path, questions_path, ...
    reader.check(DataConfig(format=name, args={first: "data.json"}), "stages.s.data.0")
    typo = first[:-1]
    with pytest.raises(ConfigError, match=rf"^stages\.s\.data\.0\.args\.{typo}: not an argument of "
                                          rf"{reader.__name__} \(did you mean '{first}'\?\)"):
        reader.check(DataConfig(format=name, args={typo: "data.json"}), "stages.s.data.0")


@pytest.mark.parametrize("name", names("tasks"))
def test_a_task_refuses_a_setting_it_cannot_use(name):
    cls = registry("tasks").get(name)
    task = cls.build(None, None)
    assert isinstance(task, cls) and task.data_format in registry("data_formats")
    ev = OmegaConf.structured(EvalConfig(task=name))
    ev.data.args = dict(TASKS[name])
    cls.check(ev, "evals.e")
    ev.rerank_k = 0  # retrieval's only, and >= 1
    with pytest.raises(ConfigError, match=r"^evals\.e\.rerank_k: "):
        cls.check(ev, "evals.e")


# ---------------------------------------------------------------------------------------------
# the feature-cache rule: declared by the connector and the objective, combined once


@pytest.mark.parametrize("connector", names("connectors"))
@pytest.mark.parametrize("objective", names("objectives"))
def test_the_feature_cache_rule_combines_what_the_connector_and_the_objective_declare(connector, objective):
    connector_cls, objective_cls = registry("connectors").get(connector), registry("objectives").get(objective)
    refusal = feature_cache_refusal(connector_cls, objective_cls, "frozen", objective)
    expected_ok = connector_cls.feature_cache_conflict() is None and not objective_cls.needs_pixels
    assert (refusal is None) == expected_ok, refusal
    assert feature_cache_refusal(connector_cls, objective_cls, "full", objective).startswith(
        "needs train.vision: frozen")


# ---------------------------------------------------------------------------------------------
# experiment trackers


@pytest.mark.parametrize("name", names("trackers"))
def test_a_tracker_builds_for_a_stage_folder_logs_and_closes(name, tmp_path, monkeypatch):
    import json

    from vlm.training.trackers import Tracker, TrackerContext

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cls = registry("trackers").get(name)
    assert cls.Options is None
    cls.check(None, "report_to.0")  # installed (the test extra names every tracker's package)
    ctx = TrackerContext(folder=tmp_path / "s", run_dir=tmp_path, stage="s", run_name="run", project="vlm",
                         run_id="0123456789abcdef")
    tracker = cls.build(None, ctx)
    if name == "jsonl":  # metrics.jsonl is written by the trainer's MetricsLog in every run
        assert tracker is None
        return
    assert isinstance(tracker, Tracker)
    tracker.log_config({"model": {"template": "plain"}, "stages": {"s": {"max_steps": 2}}})
    tracker.log({"train/loss": 1.5}, 1)
    tracker.flush()
    json.dumps(tracker.state())  # stored in the stage's tracking.json
    tracker.close()
