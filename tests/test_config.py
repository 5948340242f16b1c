"""Config loading: validation errors name the dotted key and suggest a fix, overrides and
interpolations apply, and a saved config loads back equal."""

from __future__ import annotations

import pytest
import yaml
from conftest import LLM_ARCH, VISION_ARCH
from omegaconf import OmegaConf

from vlm.app.wiring import load_run_config
from vlm.config import ConfigError, Train, save_config, to_container


@pytest.fixture
def recipe(tmp_path):
    """A valid recipe YAML with one stage; returns its path."""
    recipe = {
        "out_dir": str(tmp_path / "run"),
        "prepare": {"shapes": {"out": "${out_dir}/data", "num_train": 8}},
        "model": {"vision": {"name": "hf_clip", "arch": dict(VISION_ARCH)},
                  "llm": {"tokenizer": "${out_dir}/tokenizer", "arch": dict(LLM_ARCH)}},
        "stages": {"align": {"data": [{"format": "coco_captions",
                                        "args": {"path": "${prepare.shapes.out}/captions_train.json",
                                                 "image_root": "${prepare.shapes.out}/images/train"}}],
                             "learning_rate": 1e-3}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_valid_recipe_loads_with_schema_types(recipe):
    cfg = load_run_config(recipe)
    assert cfg.stages.align.batch_size == 8  # schema default
    assert cfg.stages.align.train.llm == Train.frozen
    assert cfg.model.vision.arch.hidden_size == VISION_ARCH["hidden_size"]


def test_unknown_stage_key_names_the_dotted_key_and_suggests_the_closest(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["stages.align.lerning_rate=0.1"])
    message = str(info.value)
    assert "stages.align.lerning_rate" in message
    assert "did you mean 'learning_rate'" in message


def test_unknown_key_in_the_yaml_file_is_reported_with_the_file(tmp_path, recipe):
    data = yaml.safe_load(recipe.read_text())
    data["model"]["conector"] = {"name": "mlp2x_gelu"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.conector.*did you mean 'connector'"):
        load_run_config(bad)


def test_unknown_key_fails_in_the_cli_before_any_model_is_built(recipe, monkeypatch, capsys):
    import vlm.app.cli
    import vlm.modeling.vlm

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the config was validated")

    monkeypatch.setattr(vlm.modeling.vlm.VisionLanguageModel, "from_config", classmethod(forbidden))
    with pytest.raises(SystemExit) as info:
        vlm.app.cli.main(["train", str(recipe), "stages.align.lerning_rate=0.1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "stages.align.lerning_rate" in err and "learning_rate" in err


def test_wrong_type_names_the_key(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["stages.align.batch_size=abc"])
    assert "stages.align.batch_size" in str(info.value)
    assert "abc" in str(info.value)


def test_unknown_enum_value_names_the_key(recipe):
    with pytest.raises(ConfigError, match="stages.align.train.llm"):
        load_run_config(recipe, ["stages.align.train.llm=qlora"])


def test_unknown_registry_name_suggests_the_registered_one(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["model.vision.name=hf_clp"])
    message = str(info.value)
    assert message.startswith("model.vision.name")
    assert "did you mean 'hf_clip'" in message


def test_unknown_connector_and_template_names_are_reported(recipe):
    with pytest.raises(ConfigError, match=r"model\.connector\.name.*did you mean 'mlp2x_gelu'"):
        load_run_config(recipe, ["model.connector.name=mlp2x_gelo"])
    with pytest.raises(ConfigError, match=r"stages\.align\.template.*did you mean 'vicuna_v1'"):
        load_run_config(recipe, ["stages.align.template=vicuna"])


def test_unknown_reader_argument_names_the_key_and_suggests(tmp_path, recipe):
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["align"]["data"][0]["args"]["imag_root"] = data["stages"]["align"]["data"][0]["args"].pop("image_root")
    bad = tmp_path / "bad_reader.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_run_config(bad)
    message = str(info.value)
    assert "stages.align.data.0.args.imag_root" in message
    assert "did you mean 'image_root'" in message


def test_unknown_reader_format_is_reported(recipe):
    with pytest.raises(ConfigError, match=r"stages\.align\.data\.0\.format.*coco_captions"):
        load_run_config(recipe, ["stages.align.data.0.format=coco_caption"])


def test_unknown_vision_arch_field_names_the_key(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["model.vision.arch.hiden_size=64"])
    message = str(info.value)
    assert "model.vision.arch.hiden_size" in message
    assert "did you mean 'hidden_size'" in message


def test_unknown_component_option_names_the_key(recipe):
    with pytest.raises(ConfigError, match=r"model\.connector\.options\.biass.*'bias'"):
        load_run_config(recipe, ["model.connector.options.biass=false"])


def test_lora_on_vision_is_refused(recipe):
    with pytest.raises(ConfigError, match=r"stages\.align\.train.*llm only"):
        load_run_config(recipe, ["stages.align.train.vision=lora"])


def test_dotted_overrides_apply_with_schema_types(recipe):
    cfg = load_run_config(recipe, ["stages.align.learning_rate=0.5", "stages.align.batch_size=3",
                               "stages.align.train.llm=lora", "stages.align.init_from=/runs/x/final",
                               "model.vision.arch.num_hidden_layers=2"])
    assert cfg.stages.align.learning_rate == 0.5 and isinstance(cfg.stages.align.learning_rate, float)
    assert cfg.stages.align.batch_size == 3
    assert cfg.stages.align.train.llm == Train.lora
    assert cfg.model.vision.arch.num_hidden_layers == 2
    assert cfg.model.vision.arch.hidden_size == VISION_ARCH["hidden_size"], "siblings stay"


def test_dotted_override_into_a_list_item_applies(recipe):
    cfg = load_run_config(recipe, ["stages.align.data.0.max_samples=7", "stages.align.data.0.args.path=/x/c.json"])
    assert cfg.stages.align.data[0].max_samples == 7
    assert cfg.stages.align.data[0].args.path == "/x/c.json"
    assert cfg.stages.align.data[0].format == "coco_captions", "siblings stay"
    with pytest.raises(ConfigError, match=r"stages\.align\.data\[0\]\.formt.*'format'"):
        load_run_config(recipe, ["stages.align.data.0.formt=jsonl"])


def test_interpolations_resolve_and_command_line_out_dir_wins(tmp_path, recipe):
    cfg = load_run_config(recipe)
    run = str(tmp_path / "run")
    assert cfg.prepare.shapes.out == f"{run}/data"
    assert cfg.stages.align.data[0].args.image_root == f"{run}/data/images/train"
    assert cfg.model.llm.tokenizer == f"{run}/tokenizer"
    moved = load_run_config(recipe, out_dir="/elsewhere")
    assert moved.stages.align.data[0].args.path == "/elsewhere/data/captions_train.json"


def test_save_config_writes_a_resolved_yaml_that_loads_back_equal(tmp_path, recipe):
    cfg = load_run_config(recipe, ["stages.align.batch_size=5", "stages.align.train.llm=full"])
    saved = tmp_path / "saved" / "config.yaml"
    save_config(cfg, saved)
    text = saved.read_text()
    assert "${" not in text, "the saved config must be resolved"
    assert OmegaConf.load(saved).stages.align.train.llm == "full"
    again = load_run_config(saved)
    assert to_container(again) == to_container(cfg)
    assert again.stages.align.batch_size == 5


def test_missing_config_file_and_malformed_override_are_config_errors(tmp_path, recipe):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_run_config(recipe, ["stages.align.batch_size"])


def test_stage_without_data_is_refused(recipe):
    with pytest.raises(ConfigError, match=r"stages\.empty\.data"):
        load_run_config(recipe, ["stages.empty.learning_rate=0.1"])


def test_data_repeat_must_be_positive_and_is_refused_in_evals(recipe):
    assert load_run_config(recipe, ["stages.align.data.0.repeat=3"]).stages.align.data[0].repeat == 3
    with pytest.raises(ConfigError, match=r"stages\.align\.data\.0\.repeat = 0: must be >= 1"):
        load_run_config(recipe, ["stages.align.data.0.repeat=0"])
    ev = ["evals.cap.task=caption", "evals.cap.data.format=coco_captions", "evals.cap.data.args.path=c.json"]
    load_run_config(recipe, ev)
    with pytest.raises(ConfigError, match=r"^evals\.cap\.data\.repeat: an evaluation reads each sample once"):
        load_run_config(recipe, ev + ["evals.cap.data.repeat=2"])


def test_unknown_preprocess_strategy_is_refused_at_load(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["model.vision.preprocess=pda"])
    message = str(info.value)
    assert message.startswith("model.vision.preprocess:")
    assert "did you mean 'pad'" in message and "resize_center_crop" in message


def test_unknown_llm_dtype_is_refused_at_load(recipe):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, ["model.llm.dtype=bfloat61"])
    message = str(info.value)
    assert message.startswith("model.llm.dtype:")
    assert "did you mean 'bfloat16'" in message and "float32" in message
    assert load_run_config(recipe, ["model.llm.dtype=bfloat16"]).model.llm.dtype == "bfloat16"


def test_vqa_eval_without_annotations_path_is_refused(tmp_path, recipe):
    data = yaml.safe_load(recipe.read_text())
    data["evals"] = {"vqa": {"task": "vqa", "data": {"format": "vqav2", "args": {
        "questions_path": "/data/q.json", "annotations_path": "/data/a.json"}}}}
    path = tmp_path / "with_vqa.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_run_config(path).evals.vqa.data.args.annotations_path == "/data/a.json"
    with pytest.raises(ConfigError, match=r"^evals\.vqa\.data\.args\.annotations_path"):
        load_run_config(path, ["evals.vqa.data.args.annotations_path=null"])


@pytest.mark.parametrize("override, suggestion", [
    ("stages.align.lerning_rate=0.1", "learning_rate"),
    ("model.conector.name=linear", "connector"),
    ("model.connector.options.bais=false", "bias"),
])
def test_did_you_mean_appears_once(recipe, override, suggestion):
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, [override])
    message = str(info.value)
    assert message.lower().count("did you mean") == 1, message
    assert f"(did you mean '{suggestion}'?)" in message


def test_vars_interpolate_are_set_from_the_command_line_and_saved_resolved(tmp_path, recipe):
    data = yaml.safe_load(recipe.read_text())
    data["vars"] = {"images": "???", "captions": "${vars.images}/../captions.json"}
    data["stages"]["align"]["data"][0]["args"] = {"path": "${vars.captions}", "image_root": "${vars.images}"}
    path = tmp_path / "vars.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"vars\.images.*vars\.images=\.\.\."):
        load_run_config(path)
    cfg = load_run_config(path, ["vars.images=/data/img"])
    assert cfg.stages.align.data[0].args.image_root == "/data/img"
    assert cfg.stages.align.data[0].args.path == "/data/img/../captions.json"
    save_config(cfg, tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["stages"]["align"]["data"][0]["args"]["image_root"] == "/data/img"
    assert saved["vars"]["images"] == "/data/img"


def test_an_unknown_variable_is_a_config_error_naming_the_key(tmp_path, recipe):
    data = yaml.safe_load(recipe.read_text())
    data["stages"]["align"]["data"][0]["args"]["image_root"] = "${vars.imgs}"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"stages\.align\.data\[0\]\.args\.image_root.*vars\.imgs"):
        load_run_config(path)


def test_an_override_that_is_not_yaml_is_taken_as_a_string(recipe):
    cfg = load_run_config(recipe, ["vars.image_pattern={image_id:012d}.png"])
    assert cfg.vars.image_pattern == "{image_id:012d}.png"


def test_the_vqa_from_scratch_recipe_takes_all_its_data_from_vars():
    names = ["train_images", "train_captions", "train_questions", "train_annotations", "test_images",
             "test_captions", "test_questions", "test_annotations"]
    overrides = [f"vars.{n}=/DATA/{n}" for n in names] + ["vars.image_pattern={image_id:012d}.png"]
    cfg = load_run_config("configs/recipes/vqa_from_scratch.yaml", overrides)
    keys = ("path", "image_root", "questions_path", "annotations_path", "image_pattern")
    datasets = [d for stage in cfg.stages.values() for d in stage.data] + list(cfg.prepare.tokenizer.data)
    datasets += [ev.data for ev in cfg.evals.values()]
    paths = [v for d in datasets for k, v in d.args.items() if k in keys]
    assert paths and all(v.startswith("/DATA/") or v == "{image_id:012d}.png" for v in paths), paths
    assert all(stage.eval_every for name, stage in cfg.stages.items() if name != "vision_warmup")
