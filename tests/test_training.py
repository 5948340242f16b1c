"""Training through ``vlm.app.stages.run_stage``: the loss goes down, resume is exact, a crash while
writing a checkpoint leaves the previous one intact, and stages chain through their outputs."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import NUM_PATCHES, run_config
from safetensors.torch import load_file

import vlm.app.stages
import vlm.checkpoint.components
import vlm.checkpoint.pretrained
import vlm.checkpoint.train_state
import vlm.modeling.processing
from vlm.training.callbacks import Callback


def captions(shapes, max_samples=None):
    data = {"format": "coco_captions",
            "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}
    if max_samples:
        data["max_samples"] = max_samples
    return data


def conversations(shapes, max_samples=None):
    data = {"format": "llava_json",
            "args": {"path": shapes["train"]["conversations"], "image_root": shapes["train"]["image_root"]}}
    if max_samples:
        data["max_samples"] = max_samples
    return data


def read_metrics(folder: Path):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tensors(path) -> dict:
    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_state(a, b, where=""):
    """Recursive bitwise equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


class Capture(Callback):
    """Keeps the model's weights as they were when training began."""

    def on_train_start(self, ctx, position):
        self.initial_state = {k: v.detach().clone() for k, v in ctx.model().state_dict().items()}


# ---------------------------------------------------------------------------------------------
# (a) the loss goes down


def test_loss_goes_down_and_metrics_and_plot_are_written(tmp_path, tokenizer_dir, shapes_data):
    stages = {"caption": {
        "train": {"vision": "frozen", "connector": "full", "llm": "full"},
        "data": [captions(shapes_data, max_samples=32)],
        "learning_rate": 3e-3, "batch_size": 8, "max_steps": 30, "warmup_ratio": 0.1, "log_every": 5,
    }}
    cfg = run_config(tmp_path, tokenizer_dir, stages)
    started = time.perf_counter()
    final = vlm.app.stages.run_stage(cfg, "caption")
    wall = time.perf_counter() - started
    out = Path(cfg.out_dir) / "caption"
    assert final == out / "final" and (final / "manifest.json").is_file()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert {"loss", "lr", "samples_per_s"} <= r.keys()
        assert r["samples_per_s"] > 0 and r["lr"] >= 0
        assert r["samples"] / r["samples_per_s"] <= wall  # each window timed from its own start
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, f"loss only went from {first:.3f} to {last:.3f}"  # more than a nat
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()


def test_the_last_shorter_accumulation_window_is_averaged_over_its_own_length(tmp_path, tokenizer_dir,
                                                                             shapes_data):
    """12 samples in batches of 4 are 3 micro-batches per epoch; with grad_accum 2 the epoch's
    second window holds micro-batch 3 alone, so its gradient is that batch's, as with grad_accum 1
    (the learning rate is ~0, so the weights, and the gradients, do not move between steps)."""
    def grad_norms(grad_accum, steps, out):
        stages = {"s": {"data": [captions(shapes_data, max_samples=12)], "batch_size": 4, "grad_accum": grad_accum,
                        "max_steps": steps, "learning_rate": 1e-12, "warmup_ratio": 0.0, "log_every": 1,
                        "max_grad_norm": 1e9}}
        cfg = run_config(tmp_path, tokenizer_dir, stages, out_dir=tmp_path / out)
        run = vlm.app.stages.build_stage(cfg, "s")
        run.trainer.train()
        return [r["grad_norm"] for r in run.trainer.history]

    one = grad_norms(1, 3, "one")
    two = grad_norms(2, 2, "two")
    assert one[2] == pytest.approx(two[1], rel=1e-4)
    assert one[2] > 0 and two[0] != pytest.approx(one[0], rel=1e-3)  # the first window is really two batches


# ---------------------------------------------------------------------------------------------
# a two-stage chain shared by the resume and chain tests: base (LLM full) -> instruct (LoRA)


def chain_stages(shapes, base_final: Path):
    return {
        "base": {"train": {"vision": "full", "connector": "full", "llm": "full"},
                 "data": [captions(shapes, max_samples=16)], "learning_rate": 2e-3, "batch_size": 8,
                 "max_steps": 2, "warmup_ratio": 0.0},
        "instruct": {"init_from": str(base_final),
                     "train": {"vision": "frozen", "connector": "full", "llm": "lora"},
                     "lora": {"r": 4, "alpha": 8, "dropout": 0.2},
                     "template": "chatml", "max_length": 96,
                     "data": [conversations(shapes, max_samples=10)], "learning_rate": 5e-3,
                     "batch_size": 4, "grad_accum": 2, "max_steps": 7, "save_every": 3, "log_every": 1,
                     "warmup_ratio": 0.2},
    }


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tokenizer_dir, shapes_data):
    root = tmp_path_factory.mktemp("chain")
    out_a = root / "A"
    cfg = run_config(root, tokenizer_dir, chain_stages(shapes_data, out_a / "base" / "final"), out_dir=out_a)
    instruct = Capture()
    base_final = vlm.app.stages.run_stage(cfg, "base")
    instruct_run = vlm.app.stages.build_stage(cfg, "instruct", callbacks=[instruct])
    instruct_final = instruct_run.trainer.train()
    return {"root": root, "cfg": cfg, "base_final": base_final, "instruct_final": instruct_final,
            "instruct_trainer": instruct_run.trainer, "instruct_initial_state": instruct.initial_state}


def test_resume_from_a_checkpoint_reproduces_the_run_bitwise(chain, tokenizer_dir, shapes_data):
    root = chain["root"]
    a = Path(chain["cfg"].out_dir) / "instruct"
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    # B: same recipe, another out_dir, starting from A's step-3 checkpoint only
    out_b = root / "B"
    cfg_b = run_config(root, tokenizer_dir, chain_stages(shapes_data, chain["base_final"]), out_dir=out_b)
    b = out_b / "instruct"
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    final_b = vlm.app.stages.run_stage(cfg_b, "instruct", resume=True)

    final_a = chain["instruct_final"]
    for rel in ("connector.safetensors", "llm_adapter/adapter_model.safetensors"):
        assert_same_tensors(tensors(final_a / rel), tensors(final_b / rel))
    # the run did move after step 3, so equality is not trivial
    at_3 = tensors(a / "checkpoints" / "step_0000003" / "llm_adapter" / "adapter_model.safetensors")
    at_end = tensors(final_a / "llm_adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(at_3[k], at_end[k]) for k in at_3)

    # optimizer, scheduler, RNG and data position at step 6 are the same too
    state_a = vlm.checkpoint.train_state.load_training_state(a / "checkpoints" / "step_0000006")
    state_b = vlm.checkpoint.train_state.load_training_state(b / "checkpoints" / "step_0000006")
    assert state_a["position"]["step"] == state_b["position"]["step"] == 6
    steps = {float(s["step"]) for s in state_b["optimizer"]["state"].values()}
    assert steps == {6.0}, "AdamW's step count must continue from the checkpoint"
    assert_same_state(state_a["optimizer"], state_b["optimizer"], "optimizer")
    assert_same_state(state_a["scheduler"], state_b["scheduler"], "scheduler")
    assert_same_state(state_a["position"], state_b["position"], "position")

    resumed = read_metrics(b)
    original = {r["step"]: r for r in read_metrics(a)}
    assert [r["step"] for r in resumed] == [4, 5, 6, 7]
    for r in resumed:
        assert r["loss"] == original[r["step"]]["loss"]
        assert r["lr"] == original[r["step"]]["lr"]


def test_step_three_checkpoint_holds_adamw_step_count_three_and_its_position(chain):
    state = vlm.checkpoint.train_state.load_training_state(Path(chain["cfg"].out_dir) / "instruct" / "checkpoints" / "step_0000003")
    assert state["position"]["step"] == 3
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}


def test_next_stage_starts_from_the_previous_stage_final_weights(chain):
    base_final = chain["base_final"]
    initial = chain["instruct_initial_state"]
    for component in ("connector", "vision"):
        saved = tensors(base_final / f"{component}.safetensors")
        for name, value in saved.items():
            key = f"{component}.{name}"
            assert torch.equal(initial[key], value), key
    llm_saved = tensors(base_final / "llm.safetensors")
    matched = 0
    for key, value in initial.items():
        if not key.startswith("llm.") or "lora_" in key:
            continue
        name = key.removeprefix("llm.base_model.model.").replace(".base_layer.", ".")
        if name in llm_saved:
            assert torch.equal(value, llm_saved[name]), name
            matched += 1
    assert matched == len(llm_saved)


def test_load_pretrained_rebuilds_a_model_with_the_trained_logits(chain, image_paths):
    trained = chain["instruct_trainer"]._unwrapped().eval()
    model, tokenizer, model_cfg = vlm.checkpoint.pretrained.load_pretrained(chain["instruct_final"])
    assert not any("lora" in n for n, _ in model.named_parameters()), "adapters are merged on load"
    processor = vlm.modeling.processing.build_processor(model, tokenizer, model_cfg, template="chatml")
    from vlm.data.batch import Collator
    from vlm.data.types import Sample, Turn

    items = [processor.encode(Sample(str(i), [Turn("user", "<image>\nWhat color is the shape?"),
                                              Turn("assistant", "red")], [p]))
             for i, p in enumerate(image_paths[:2])]
    batch = Collator(tokenizer.pad_token_id)(items).model_inputs()
    with torch.no_grad():
        expected = trained(**batch)
        got = model(**batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    # and it is not the untrained base: the LoRA stage changed the function
    base, _, _ = vlm.checkpoint.pretrained.load_pretrained(chain["base_final"])
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, got.logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# (c) a crash while writing a checkpoint


def small_stage(shapes, **extra):
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
             "data": [captions(shapes, max_samples=8)], "batch_size": 4, "max_steps": 5, "save_every": 2,
             "log_every": 1}
    stage.update(extra)
    return {"align": stage}


def leftovers(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, tokenizer_dir, shapes_data, monkeypatch):
    cfg = run_config(tmp_path, tokenizer_dir, small_stage(shapes_data))
    out = Path(cfg.out_dir) / "align"
    original = vlm.checkpoint.train_state.save_training_state
    calls = []

    def crash_on_second(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            (folder / vlm.checkpoint.train_state.TRAINING_STATE).write_bytes(b"half a pickle")
            raise RuntimeError("disk full")
        return original(folder, *args, **kwargs)

    monkeypatch.setattr("vlm.training.trainer.save_training_state", crash_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        vlm.app.stages.run_stage(cfg, "align")
    monkeypatch.setattr("vlm.training.trainer.save_training_state", original)

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert leftovers(out) == []
    assert not (out / "final").exists()
    assert vlm.checkpoint.train_state.latest_checkpoint(out / "checkpoints") == out / "checkpoints" / "step_0000002"
    assert vlm.checkpoint.train_state.load_training_state(out / "checkpoints" / "step_0000002")["position"]["step"] == 2
    # and the run can resume from it to the end
    final = vlm.app.stages.run_stage(cfg, "align", resume=True)
    assert (final / "connector.safetensors").is_file()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_crash_while_writing_final_keeps_the_previous_final(tmp_path, tokenizer_dir, shapes_data, monkeypatch):
    cfg = run_config(tmp_path, tokenizer_dir, small_stage(shapes_data, save_every=None))
    final = vlm.app.stages.run_stage(cfg, "align")
    before = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert Path("connector.safetensors") in before

    original = vlm.checkpoint.components.save_model_state

    def crash_after_writing(model, folder, *args, **kwargs):
        original(model, folder, *args, **kwargs)
        raise RuntimeError("killed while saving")

    monkeypatch.setattr("vlm.app.stages.save_model_state", crash_after_writing)
    other_seed = run_config(tmp_path, tokenizer_dir, small_stage(shapes_data, save_every=None, seed=1,
                                                                 learning_rate=0.05))
    with pytest.raises(RuntimeError, match="killed while saving"):
        vlm.app.stages.run_stage(other_seed, "align")
    after = {p.relative_to(final): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert after == before
    assert leftovers(final.parent) == []


def test_a_model_image_token_other_than_image_marks_the_data(tmp_path, tokenizer_dir, shapes_data):
    """``model.image_token: "<img>"``: conversations written with ``<img>`` are read, tokenised
    (one run of placeholders per marker) and trained on; ``<image>`` is then plain text."""
    rows = json.loads(Path(shapes_data["train"]["conversations"]).read_text())[:8]
    for row in rows:
        for turn in row["conversations"]:
            turn["value"] = turn["value"].replace("<image>", "<img>")
    path = tmp_path / "img.json"
    path.write_text(json.dumps(rows))
    data = {"format": "llava_json", "args": {"path": str(path), "image_root": shapes_data["train"]["image_root"]}}
    stages = {"s": {"data": [data], "template": "chatml", "batch_size": 4, "max_steps": 2, "log_every": 1}}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model={"image_token": "<img>"})
    run = vlm.app.stages.build_stage(cfg, "s")
    assert len(run.dataset) == 8
    item = run.dataset[0]
    processor = run.dataset.processor
    assert processor.tokenizer.convert_ids_to_tokens(processor.image_token_id) == "<img>"
    assert item.input_ids.count(processor.image_token_id) == run.trainer._unwrapped().num_image_tokens
    assert item.instructions and "<img>" not in item.instructions[0]
    run.trainer.train()
    assert all(math.isfinite(r["loss"]) for r in run.trainer.history)

    plain = {"s": {"data": [data], "template": "plain", "batch_size": 4, "max_steps": 1}}
    cfg = run_config(tmp_path, tokenizer_dir, plain, model={"image_token": "<img>"}, out_dir=tmp_path / "plain")
    item = vlm.app.stages.build_stage(cfg, "s").dataset[0]
    assert item.input_ids.count(processor.image_token_id) == NUM_PATCHES
