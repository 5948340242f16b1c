"""Speed levers: what `auto` picks per hardware class (mocked), overrides, bad values, the image cache."""

import pytest
import torch
from test_hardware import AMX, AVX2, AVX512, AVX512_BF16, CUDA_BF16, CUDA_NO_BF16

from vlm.config import StageConfig, TrainerSettings, load_config
from vlm.core.errors import ConfigError
from vlm.core.levers import (
    LEVERS,
    StageFacts,
    choose_levers,
    describe,
    parse_switch,
    parse_workers,
)
from vlm.data.image_cache import DecodedImageCache


def facts(precision, rereads=True, feature_cache=False, cores=2):
    return StageFacts(precision=precision, rereads_images=rereads, feature_cache=feature_cache, cores=cores)


def auto(hardware, stage_facts):
    return {name: choice.value for name, choice in choose_levers({}, stage_facts, hardware).items()}


# (hardware, resolved precision) -> compile, channels_last, training_attention, frozen_weight_cast
@pytest.mark.parametrize("hardware, precision, expected", [
    (CUDA_BF16, "bf16", (True, True, False, True)),
    (CUDA_NO_BF16, "fp32", (True, True, False, False)),
    (AMX, "bf16", (True, True, True, True)),
    (AVX512_BF16, "bf16", (True, True, True, True)),
    (AVX512_BF16, "fp32", (False, True, False, False)),
    (AVX512, "fp32", (False, True, False, False)),
    (AVX2, "fp32", (False, True, False, False)),
    (AVX2, "bf16", (True, False, True, True)),  # asked for explicitly: emulated, channels-last was slower
])
def test_auto_levers_by_hardware_class_and_precision(hardware, precision, expected):
    chosen = auto(hardware, facts(precision))
    assert (chosen["compile"], chosen["channels_last"], chosen["training_attention"],
            chosen["frozen_weight_cast"]) == expected


def test_every_auto_choice_says_why_and_names_the_class():
    choices = choose_levers({}, facts("fp32"), AVX2)
    assert set(choices) == set(LEVERS)
    for choice in choices.values():
        assert choice.requested == "auto" and choice.reason.startswith("auto on cpu-avx2: ")
    assert "compile off (auto)" in describe(choices)


def test_workers_and_image_cache_follow_the_stage():
    assert auto(AVX2, facts("fp32", cores=2))["num_workers"] == 0
    assert auto(CUDA_BF16, facts("bf16", cores=16))["num_workers"] == 4
    assert auto(AVX2, facts("fp32", rereads=True))["image_cache"] is True
    assert auto(AVX2, facts("fp32", rereads=False))["image_cache"] is False
    assert auto(AVX2, facts("fp32", rereads=True, feature_cache=True))["image_cache"] is False


def test_explicit_values_override_auto():
    requested = {"compile": True, "channels_last": "false", "num_workers": 3, "image_cache": False}
    choices = choose_levers(requested, facts("fp32"), AVX2)
    assert choices["compile"].value is True and choices["compile"].reason == "set in the config"
    assert choices["channels_last"].value is False
    assert choices["num_workers"].value == 3
    assert choices["image_cache"].value is False
    assert choices["training_attention"].requested == "auto"


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), ("AUTO", "auto"), ("True", True)])
def test_parse_switch(value, expected):
    assert parse_switch(value, "x") == expected


def test_bad_lever_values_name_the_key():
    with pytest.raises(ConfigError, match=r"stages.s.compile = 'sometimes': must be auto, true or false"):
        parse_switch("sometimes", "stages.s.compile")
    with pytest.raises(ConfigError, match=r"num_workers = -1: must be auto or a number"):
        parse_workers(-1, "stages.s.num_workers")
    assert parse_workers("2", "w") == 2 and parse_workers("auto", "w") == "auto"


def test_a_config_with_a_bad_lever_fails_on_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stages:\n  s:\n    channels_last: maybe\n")
    with pytest.raises(ConfigError, match=r"stages\.s\.channels_last = 'maybe'"):
        load_config(path)
    path.write_text("stages:\n  s:\n    compile: true\n    num_workers: 0\n")  # what older runs wrote
    cfg = load_config(path)
    assert cfg.stages.s.compile is True and cfg.stages.s.num_workers == 0
    assert cfg.stages.s.image_cache == "auto"


def test_the_trainer_refuses_unresolved_levers():
    stage = StageConfig(precision="fp32")
    with pytest.raises(ValueError, match="compile 'auto' reached the trainer unresolved"):
        TrainerSettings.of(stage)
    resolved = StageConfig(precision="fp32", compile=False, num_workers=0, training_attention=False,
                           frozen_weight_cast=True)
    settings = TrainerSettings.of(resolved)
    assert settings.compile is False and settings.num_workers == 0 and settings.frozen_weight_cast is True


def test_the_image_cache_decodes_each_image_once_within_its_budget():
    calls = []

    def load(path):
        calls.append(path)
        return torch.full((3, 4, 4), float(len(path)))

    cache = DecodedImageCache(load, max_bytes=2 * 3 * 4 * 4 * 4)  # room for two images
    first = cache("a.png")
    assert torch.equal(cache("a.png"), first) and calls == ["a.png"]
    cache("bb.png"), cache("ccc.png"), cache("ccc.png")
    assert calls == ["a.png", "bb.png", "ccc.png", "ccc.png"]  # the third did not fit: loaded each time
    assert len(cache) == 2 and cache.hits == 1 and cache.misses == 4
    assert torch.equal(cache("ccc.png"), torch.full((3, 4, 4), 7.0))


def test_a_stage_resolves_its_levers_writes_them_and_caches_images(tmp_path, tokenizer_dir, shapes_data):
    import json

    from conftest import run_config

    from vlm.app.stages import LEVERS_FILE, build_stage

    data = [{"format": "coco_captions", "args": {"path": shapes_data["train"]["captions"],
                                                 "image_root": shapes_data["train"]["image_root"]}}]
    cfg = run_config(tmp_path, tokenizer_dir, {
        "align": {"train": {"connector": "full"}, "data": data, "batch_size": 4, "epochs": 2,
                  "precision": "fp32", "training_attention": False},
        "again": {"train": {"connector": "full"}, "data": data, "batch_size": 4, "image_cache": False,
                  "precision": "fp32"}})
    run = build_stage(cfg, "align", load_init=False)
    written = json.loads((tmp_path / "run" / "align" / LEVERS_FILE).read_text())
    assert written["image_cache"]["value"] is True and written["image_cache"]["requested"] == "auto"
    assert written["training_attention"] == {"requested": False, "value": False, "reason": "set in the config"}
    assert run.trainer.settings.training_attention is False
    assert isinstance(run.dataset.load_image, DecodedImageCache)
    plain = build_stage(cfg, "again", load_init=False).dataset
    assert not isinstance(plain.load_image, DecodedImageCache)
    for index in (0, 1, 0):  # cached or not, the same pixels
        assert torch.equal(run.dataset[index].images[0], plain[index].images[0])
    assert run.dataset.load_image.hits >= 1


@pytest.mark.parametrize("settings, cached", [
    ({"epochs": 1.0}, False),                            # each image read once
    ({"epochs": 2.0}, True),                             # a second epoch reads them again
    ({"epochs": 1.0, "max_steps": 8, "batch_size": 4}, True),  # 32 samples drawn from 16: past one pass
    ({"epochs": 1.0, "max_steps": 2, "batch_size": 4}, False),
])
def test_the_image_cache_is_on_when_a_stage_rereads_its_images(settings, cached):
    from omegaconf import OmegaConf

    from vlm.app.stages import resolved_levers
    from vlm.data.types import Sample, Turn

    stage = OmegaConf.merge(OmegaConf.structured(StageConfig), {"precision": "fp32", **settings})
    samples = [Sample(str(i), [Turn("user", "<image>"), Turn("assistant", "x")], [f"{i}.png"]) for i in range(16)]
    resolved, choices = resolved_levers(stage, "s", samples)
    assert choices["image_cache"].value is cached and resolved.image_cache is cached
    shared = samples + [Sample("again", samples[0].turns, ["0.png"])]  # two samples, one image
    assert resolved_levers(OmegaConf.merge(OmegaConf.structured(StageConfig), {"precision": "fp32"}),
                           "s", shared)[1]["image_cache"].value is True
