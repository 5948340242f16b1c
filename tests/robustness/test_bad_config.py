"""Bad configs: every numeric field outside its domain, unknown keys and values, broken files.
Each case: exit 2, one ``error:`` line naming the file and the dotted key (and the value),
nothing written, nothing changed."""

from __future__ import annotations

import pytest
from robust_helpers import Project, error_line, run_vlm, snapshot

# (dotted override, text the error line must contain besides the key)
OUT_OF_RANGE = [
    ("stages.align.learning_rate=-0.001", "must be > 0"),
    ("stages.align.learning_rate=0", "must be > 0"),
    ("stages.align.lr.connector=-1", "must be > 0"),
    ("stages.align.batch_size=0", "must be >= 1"),
    ("stages.align.grad_accum=0", "must be >= 1"),
    ("stages.align.save_every=-1", "must be >= 0"),
    ("stages.align.epochs=0", "must be > 0"),
    ("stages.align.max_steps=0", "must be >= 1"),
    ("stages.align.warmup_ratio=1.0", "in [0, 1)"),
    ("stages.align.warmup_ratio=-0.1", "in [0, 1)"),
    ("stages.align.min_lr_ratio=2", "in [0, 1]"),
    ("stages.align.max_length=0", "must be >= 1"),
    ("stages.align.log_every=0", "must be >= 1"),
    ("stages.align.num_workers=-1", "must be auto or a number of worker processes >= 0"),
    ("stages.align.compile=sometimes", "must be auto, true or false"),
    ("stages.align.collective_timeout_s=0", "must be > 0"),
    ("stages.align.weight_decay=-0.1", "must be >= 0"),
    ("stages.align.max_grad_norm=-1", "must be >= 0"),
    ("stages.align.lora.r=0", "must be >= 1"),
    ("stages.align.lora.dropout=1.5", "in [0, 1)"),
    ("stages.align.max_nonfinite_skips=-1", "must be >= 0"),
    ("stages.align.max_image_failure_ratio=1.5", "in [0, 1]"),
    ("stages.align.data.0.repeat=0", "must be >= 1"),
    ("stages.align.data.0.max_samples=0", "must be >= 1"),
    ("evals.caption.batch_size=0", "must be >= 1"),
    ("evals.caption.max_new_tokens=0", "must be >= 1"),
    ("evals.caption.num_beams=0", "must be >= 1"),
]


@pytest.fixture
def project(tmp_path, shapes_data, tokenizer_dir):
    return Project(tmp_path, shapes_data, tokenizer_dir)


@pytest.mark.parametrize("override,must", OUT_OF_RANGE, ids=[o.split("=")[0] for o, _ in OUT_OF_RANGE])
def test_out_of_range_value_names_key_and_value(project, capsys, override, must):
    recipe = project.write()
    before = snapshot(project.root)
    code, _, err = run_vlm(["train", recipe, override, "--out", project.out], capsys)
    line = error_line(err)
    key, value = override.split("=")
    assert code == 2
    assert str(recipe) in line and f"{key} = " in line and must in line, line
    assert value.lstrip("-").rstrip("0").rstrip(".") in line, line
    assert not project.out.exists()
    assert snapshot(project.root) == before


@pytest.mark.parametrize("override,needle", [
    ("stages.align.on_nonfinite=explode", "stages.align.on_nonfinite"),
    ("stages.align.precision=bf8", "expected one of [auto, fp32, bf16, fp16]"),
    ("stages.align.lerning_rate=1", "did you mean 'learning_rate'"),
    ("stages.align.batch_size=eight", "stages.align.batch_size"),
    ("stages.align.objective=nope", "stages.align.objective"),
    ("model.connector.name=mlp3x", "model.connector.name"),
])
def test_unknown_key_or_value_is_named(project, capsys, override, needle):
    recipe = project.write()
    code, _, err = run_vlm(["train", recipe, override, "--out", project.out], capsys)
    assert code == 2 and needle in error_line(err)
    assert not project.out.exists()


@pytest.mark.parametrize("key,value", [("plugins", {"a": "b"}), ("prepare", {"extra_shapes": {"out": "x"}})])
def test_a_mapping_where_a_list_belongs_names_the_key(project, capsys, key, value):
    project.recipe[key] = value
    recipe = project.write()
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    line = error_line(err)
    named = key if key == "plugins" else "prepare.extra_shapes"
    assert code == 2 and str(recipe) in line and f"{named}: a mapping where a list is expected" in line
    assert not project.out.exists()


def test_config_that_is_not_utf8_names_the_file_and_byte(project, capsys):
    recipe = project.write()
    data = recipe.read_bytes()
    recipe.write_bytes(data[:40] + b"\xff\xfe" + data[40:])
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and str(recipe) in line and "byte 40" in line and "UTF-8" in line
    assert not project.out.exists()


def test_missing_config_file(project, capsys):
    code, _, err = run_vlm(["train", project.root / "nope.yaml", "--out", project.out], capsys)
    assert code == 2 and "nope.yaml" in error_line(err)


def test_init_from_a_missing_folder_names_it_not_a_hub_id(project, capsys):
    project.stage()["init_from"] = str(project.root / "no_such_run" / "final")
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and "init_from" in line and "no_such_run" in line and "no such folder" in line


def test_lora_on_a_random_llm_is_refused_before_training(project, capsys):
    # it would train every step and then fail at the save: refused at load, nothing written
    project.stage()["train"]["llm"] = "lora"
    recipe = project.write()
    before = snapshot(project.root)
    code, _, err = run_vlm(["train", recipe, "--out", project.out], capsys)
    line = error_line(err)
    assert code == 2 and "stages.align.train: llm: LoRA on randomly initialised weights cannot be saved" in line
    assert not project.out.exists() and snapshot(project.root) == before


def test_lora_on_an_llm_an_earlier_stage_did_not_save_is_refused_before_step_1(project, capsys, monkeypatch):
    # init_from a checkpoint whose manifest has no llm entry: known from the manifest, before training
    from omegaconf import OmegaConf

    import vlm.app.stages as stages
    from vlm.checkpoint.manifest import unsaveable_lora
    from vlm.config import ModelConfig, Train

    modes = {"vision": Train.frozen, "connector": Train.full, "llm": Train.lora}
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), project.recipe["model"])
    assert unsaveable_lora(modes, model, {"llm": [{"weights": "llm.safetensors"}]}) is None
    assert "llm: LoRA" in unsaveable_lora(modes, model, {"vision": [{"weights": "v.safetensors"}]})
    started = []
    monkeypatch.setattr(stages.Trainer, "train", lambda self, resume=False: started.append(1))
    monkeypatch.setattr(stages, "read_manifest", lambda folder: {"vision": [{"weights": "v.safetensors"}]})
    project.stage()["train"]["llm"] = "lora"
    earlier = project.root / "earlier" / "final"  # a stage output whose manifest is the one above
    (earlier / "tokenizer").mkdir(parents=True)
    (earlier / "manifest.json").write_text("{}")
    (earlier / "model.yaml").write_text("{}")
    project.stage()["init_from"] = str(earlier)
    code, _, err = run_vlm(["train", project.write(), "--out", project.out], capsys)
    assert code == 2 and "stages.align.train: llm: LoRA on randomly initialised weights" in error_line(err)
    assert not started
