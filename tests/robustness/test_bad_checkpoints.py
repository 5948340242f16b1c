"""Bad or untrusted checkpoints: flipped bytes, truncated files, manifests pointing elsewhere,
NaN weights, a model.yaml that asks for remote code. Each case: exit 2 with one line naming the
file (or tensor), or, for trust_remote_code, the flag ignored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config
from robust_helpers import Project, error_line, run_vlm, snapshot
from safetensors.torch import load_file, save_file

import vlm.app.stages
import vlm.checkpoint.fsio
import vlm.modeling.vlm


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_data, tokenizer_dir):
    """A tiny stage trained for 2 steps with a checkpoint at step 1: (project, final folder)."""
    project = Project(tmp_path_factory.mktemp("trained"), shapes_data, tokenizer_dir)
    project.stage()["save_every"] = 1
    cfg = run_config(project.root, tokenizer_dir, project.recipe["stages"], out_dir=project.out)
    return project, vlm.app.stages.run_stage(cfg, "align")


@pytest.fixture
def final(trained, tmp_path):
    """A private copy of the trained stage output."""
    copy = tmp_path / "final"
    shutil.copytree(trained[1], copy)
    return copy


@pytest.fixture
def image(trained):
    return trained[0].images("test")[0]


def chat(capsys, checkpoint, image, *extra):
    return run_vlm(["chat", checkpoint, "--image", image, "--prompt", "what?", "--max-new-tokens", "2", *extra],
                   capsys)


def chat_fails(capsys, checkpoint, image, *needles):
    before = snapshot(checkpoint)
    code, out, err = chat(capsys, checkpoint, image)
    line = error_line(err)
    assert code == 2 and out == "", err[-2000:]
    for needle in needles:
        assert needle in line, line
    assert snapshot(checkpoint) == before  # nothing "repaired" behind the user's back
    return line


def rewrite_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_flipped_byte_fails_the_sha256_check_naming_the_file(final, image, capsys):
    path = final / "connector.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    chat_fails(capsys, final, image, str(path), "sha256", "does not match")


def test_truncated_weights_with_a_checksum_name_the_file(final, image, capsys):
    path = final / "llm.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    chat_fails(capsys, final, image, str(path), "sha256")


def test_truncated_weights_without_a_checksum_name_the_file(final, image, capsys):
    path = final / "llm.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    rewrite_manifest(final, lambda m: [e.pop("sha256", None) for es in m.values() for e in es])
    chat_fails(capsys, final, image, str(path), "cannot load", "truncated")


def test_weights_of_another_layout_name_the_keys_that_differ(final, image, capsys):
    # e.g. a connector saved before an option (position_embedding) was added to the config
    path = final / "connector.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    tensors["position"] = torch.zeros(2, 2)
    del tensors[dropped]
    save_file(tensors, str(path))
    rewrite_manifest(final, lambda m: [e.pop("sha256", None) for es in m.values() for e in es])
    chat_fails(capsys, final, image, str(path), "do not fit", f"missing: ['{dropped}']", "unexpected: ['position']")


@pytest.mark.parametrize("target", ["../../../etc/passwd", "/etc/hostname"])
def test_manifest_cannot_point_outside_its_folder(final, image, capsys, target):
    rewrite_manifest(final, lambda m: m["llm"][0].update(weights=target))
    chat_fails(capsys, final, image, "manifest.json", "points outside")


def test_manifest_that_is_not_json(final, image, capsys):
    (final / "manifest.json").write_text("{not json")
    chat_fails(capsys, final, image, "manifest.json", "not a valid manifest")


def put_nan(final: Path, file: str = "connector.safetensors") -> str:
    path = final / file
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(path))
    digest = vlm.checkpoint.fsio.sha256_file(path)
    rewrite_manifest(final, lambda m: [e.update(sha256=digest) for es in m.values() for e in es
                                       if e.get("weights") == file])
    return name


def test_chat_refuses_nan_weights_naming_the_tensor(final, image, capsys):
    name = put_nan(final)
    chat_fails(capsys, final, image, str(final), name, "NaN or infinite")


def test_eval_refuses_nan_weights(trained, final, capsys):
    project = trained[0]
    put_nan(final)
    code, _, err = run_vlm(["eval", project.write(), "--checkpoint", final, "--out", project.root / "ev"], capsys)
    assert code == 2 and "NaN or infinite" in error_line(err)


def test_export_refuses_nan_weights(final, tmp_path, capsys):
    put_nan(final)
    code, _, err = run_vlm(["export", "hf-llava", final, "--out", tmp_path / "exported"], capsys)
    assert code == 2 and "NaN or infinite" in error_line(err)
    assert not (tmp_path / "exported").exists()


def test_missing_checkpoint_folder(tmp_path, image, capsys):
    chat_fails(capsys, tmp_path / "nope", image, "nope", "no such folder")


def test_folder_that_is_not_a_checkpoint(tmp_path, image, capsys):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    chat_fails(capsys, tmp_path / "stuff", image, "not a vlm stage output", "manifest.json")


def test_chat_on_a_missing_image_names_it(final, tmp_path, capsys):
    chat_fails(capsys, final, tmp_path / "nope.png", "nope.png")


def test_model_yaml_cannot_switch_on_trust_remote_code(final, image, capsys, monkeypatch):
    (final / "model.yaml").write_text((final / "model.yaml").read_text().replace(
        "trust_remote_code: false", "trust_remote_code: true"))
    assert "trust_remote_code: true" in (final / "model.yaml").read_text()
    seen = []
    original = vlm.modeling.vlm.VisionLanguageModel.from_config.__func__

    def spy(cls, model_cfg, tokenizer):
        seen.append(model_cfg.llm.trust_remote_code)
        return original(cls, model_cfg, tokenizer)

    monkeypatch.setattr(vlm.modeling.vlm.VisionLanguageModel, "from_config", classmethod(spy))
    code, _, err = chat(capsys, final, image)
    assert code == 0, err[-2000:]
    code, _, err = chat(capsys, final, image, "--trust-remote-code")
    assert code == 0, err[-2000:]
    assert seen == [False, True]  # only the explicit flag switches it on


def test_an_llm_that_needs_its_own_code_is_one_line_and_the_code_never_runs(final, image, tmp_path, capsys):
    # the checkpoint's model.yaml asks for trust_remote_code on an LLM folder with its own code
    remote = tmp_path / "remote_llm"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "remote_llama", "architectures": ["RemoteForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig",
                     "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}}))
    ran = tmp_path / "ran"
    for name in ("configuration_remote.py", "modeling_remote.py"):
        (remote / name).write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    text = (final / "model.yaml").read_text()
    (final / "model.yaml").write_text(text.replace("name_or_path: null", f"name_or_path: {remote}", 1)
                                      .replace("trust_remote_code: false", "trust_remote_code: true"))
    line = chat_fails(capsys, final, image, f"model.llm.name_or_path: {remote} needs its own Python code",
                      "--trust-remote-code")
    assert "Traceback" not in line and not ran.exists()


def test_truncated_training_state_names_the_file_on_resume(trained, tmp_path, tokenizer_dir, capsys):
    project = trained[0]
    out = tmp_path / "out"
    shutil.copytree(project.out, out)
    state = out / "align" / "checkpoints" / "step_0000001" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    shutil.rmtree(out / "align" / "final")  # killed mid-stage: a finished stage is kept, not resumed
    code, _, err = run_vlm(["train", project.write(), f"out_dir={out}", "stages.align.save_every=1", "--resume"],
                           capsys)
    line = error_line(err)
    assert code == 2 and str(state) in line and "cannot load the training state" in line
