"""The frozen-feature cache (vlm/training/features.py): training from it equals training with the
encoder running, a second build never calls the encoder, any change of image bytes, encoder
weights or encoder config recomputes, a corrupt entry is recomputed, writes are atomic, unreadable
images are skipped as before, and a stage whose encoder trains is refused (config and run time).
Exact resume with the cache on is checked through ``run_stage``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, run_config, tiny_model_config
from omegaconf import OmegaConf
from PIL import Image

import vlm.app.stages
import vlm.data.feature_cache as features_mod
import vlm.modeling.connectors
import vlm.modeling.vision
from vlm.config import ConfigError, StageConfig, Train, WhatTrains, train_modes
from vlm.data.batch import Collator
from vlm.data.dataset import ConversationDataset
from vlm.data.feature_cache import FeatureCache, FeatureCacheError, check_feature_cache
from vlm.data.types import Sample, Turn
from vlm.modeling.connectors.mlp import MLPProjector
from vlm.modeling.processing import build_processor
from vlm.modeling.vision.hf_clip import HFCLIPVisionEncoder
from vlm.training.objectives.lm import LanguageModeling
from vlm.training.stages import apply_stage, set_train_modes


def frozen_stage():
    return OmegaConf.structured(StageConfig)  # vision frozen, connector full, llm frozen


def frozen_model(model_cfg, tokenizer, seed=0):
    model = build_tiny_model(model_cfg, tokenizer, seed)
    apply_stage(model, WhatTrains.of(frozen_stage()))
    return model


def count_encoded_images(encoder) -> list:
    """A list that grows by the batch size of every forward call of ``encoder``."""
    calls: list = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    return calls


def processor_of(model, tokenizer, model_cfg):
    return build_processor(model, tokenizer, model_cfg, template="plain")


def samples_for(paths):
    """One single-image sample per path, one two-image sample, one text-only sample."""
    samples = [Sample(id=str(i), images=[p], turns=[Turn("user", "<image>\ndescribe the image briefly."),
                                                    Turn("assistant", f"a small red circle {i}")])
               for i, p in enumerate(paths)]
    samples.append(Sample(id="two", images=[paths[0], paths[-1]],
                          turns=[Turn("user", "<image>\n<image>\nwhat color is the shape?"),
                                 Turn("assistant", "red")]))
    samples.append(Sample(id="text", images=[], turns=[Turn("user", "describe the image briefly."),
                                                       Turn("assistant", "a large blue square")]))
    return samples


def rewrite_image(path, seed):
    """Overwrite the PNG at ``path`` with other pixels of the same size."""
    with Image.open(path) as image:
        size = image.size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def live_features(model, processor, path):
    with torch.no_grad():
        return model.vision(processor.load_image(path).unsqueeze(0))[0]


# ---------------------------------------------------------------------------------------------
# parity with the encoder running


def test_training_from_the_cache_gives_the_loss_and_gradients_of_the_live_encoder(
        tmp_path, model_config, tokenizer, image_paths):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    samples = samples_for(image_paths)
    reader, report = FeatureCache(tmp_path / "cache", model.vision).build(
        [p for s in samples for p in s.images], processor.load_image, progress=False)
    assert (report.images, report.computed, report.reused, report.failed) == (3, 3, 0, 0)

    live = ConversationDataset(samples, processor, progress=False)
    cached = ConversationDataset(samples, processor, progress=False, image_features=reader.load)
    collate = Collator(tokenizer.pad_token_id)
    live_batch = collate([live[i] for i in range(len(live))])
    cached_batch = collate([cached[i] for i in range(len(cached))])
    assert (live_batch.image_kind, cached_batch.image_kind) == ("pixels", "features")
    assert "pixel_values" not in cached_batch.model_inputs() and "image_features" not in live_batch.model_inputs()
    assert cached_batch.images.shape == (5, 16, model.vision.embed_dim)  # 3 + 2 images, text-only: 0
    assert torch.equal(live_batch.input_ids, cached_batch.input_ids)

    set_train_modes(model, train_modes(frozen_stage().train))
    results = []
    for batch in (live_batch, cached_batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.connector.named_parameters()}))
    (loss_live, grads_live), (loss_cached, grads_cached) = results
    torch.testing.assert_close(loss_cached, loss_live, rtol=1e-6, atol=1e-6)
    assert grads_live.keys() == grads_cached.keys() and grads_live
    for name in grads_live:
        assert grads_live[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_cached[name], grads_live[name], rtol=1e-5, atol=1e-7)

    # a text-only batch from the cache carries no features
    text_only = collate([cached[len(cached) - 1]])
    assert text_only.image_kind == "features" and text_only.images is None


# ---------------------------------------------------------------------------------------------
# hits and invalidation


def test_a_second_build_reuses_every_entry_without_calling_the_encoder(tmp_path, model_config, tokenizer,
                                                                        image_paths):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    calls = count_encoded_images(model.vision)
    root = tmp_path / "cache"
    FeatureCache(root, model.vision).build(image_paths, processor.load_image, batch_size=2, progress=False)
    assert calls == [2, 1]

    # the same bytes under another path are the same entry: content, not path, is the key
    copy = str(tmp_path / "elsewhere.png")
    shutil.copy(image_paths[1], copy)
    reader, report = FeatureCache(root, model.vision).build(image_paths + [copy], processor.load_image,
                                                            progress=False)
    assert calls == [2, 1], "a warm cache must not run the encoder"
    assert (report.images, report.reused, report.computed) == (3, 3, 0)
    for path in image_paths:
        assert reader.load(path).dtype == torch.float32
        torch.testing.assert_close(reader.load(path), live_features(model, processor, path))
    assert torch.equal(reader.load(copy), reader.load(image_paths[1]))
    entries = sorted(p.name for p in (root / FeatureCache(root, model.vision).key).rglob("*.safetensors"))
    assert len(entries) == 3


def test_changing_an_image_recomputes_only_that_image(tmp_path, model_config, tokenizer, image_paths):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    root = tmp_path / "cache"
    before, _ = FeatureCache(root, model.vision).build(image_paths, processor.load_image, progress=False)
    old = before.load(image_paths[0])
    rewrite_image(image_paths[0], seed=7)

    calls = count_encoded_images(model.vision)
    after, report = FeatureCache(root, model.vision).build(image_paths, processor.load_image, progress=False)
    assert sum(calls) == 1 and (report.computed, report.reused) == (1, 2)
    new = after.load(image_paths[0])
    assert not torch.allclose(new, old)
    torch.testing.assert_close(new, live_features(model, processor, image_paths[0]))


def test_the_key_follows_the_encoder_weights_config_dtype_and_precision(tmp_path, tokenizer_dir, tokenizer,
                                                                         image_paths):
    base_cfg = tiny_model_config(tokenizer_dir)
    key = FeatureCache(tmp_path, frozen_model(base_cfg, tokenizer).vision).key
    # the same config and weights, built again: the same key (a cache survives across runs)
    assert FeatureCache(tmp_path, frozen_model(base_cfg, tokenizer).vision).key == key

    other_keys = {}
    model = frozen_model(base_cfg, tokenizer)
    with torch.no_grad():  # a warmed-up encoder: other weights under the same config
        model.vision.model.embeddings.patch_embedding.weight.add_(1e-3)
    other_keys["weights"] = FeatureCache(tmp_path, model.vision).key
    other_keys["seed"] = FeatureCache(tmp_path, frozen_model(base_cfg, tokenizer, seed=1).vision).key
    for name, overrides in {"preprocess": {"vision.preprocess": "pad"},
                            "feature_layer": {"vision.feature_layer": -1},
                            "keep_cls": {"vision.keep_cls": True}}.items():
        cfg = tiny_model_config(tokenizer_dir, **overrides)
        other_keys[name] = FeatureCache(tmp_path, frozen_model(cfg, tokenizer).vision).key
    other_keys["precision"] = FeatureCache(tmp_path, frozen_model(base_cfg, tokenizer).vision, "bf16").key
    bf16 = frozen_model(base_cfg, tokenizer).vision.to(torch.bfloat16)
    other_keys["dtype"] = FeatureCache(tmp_path, bf16).key
    assert key not in other_keys.values(), other_keys
    assert len(set(other_keys.values())) == len(other_keys), other_keys

    # the weight change recomputes everything, and what it stores is the new encoder's output
    processor = processor_of(model, tokenizer, base_cfg)
    FeatureCache(tmp_path, frozen_model(base_cfg, tokenizer).vision).build(image_paths, processor.load_image,
                                                                           progress=False)
    calls = count_encoded_images(model.vision)
    reader, report = FeatureCache(tmp_path, model.vision).build(image_paths, processor.load_image,
                                                                progress=False)
    assert (report.computed, report.reused, sum(calls)) == (3, 0, 3)
    torch.testing.assert_close(reader.load(image_paths[2]), live_features(model, processor, image_paths[2]))
    description = json.loads((tmp_path / other_keys["weights"] / "key.json").read_text())
    assert description["feature_layer"] == -2 and description["preprocess"] == "resize"

    # entries are stored in the encoder's dtype
    bf16_reader, _ = FeatureCache(tmp_path, bf16).build(image_paths[:1], processor.load_image, progress=False)
    assert bf16_reader.load(image_paths[0]).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# corruption, atomic writes, unreadable images


def test_a_corrupt_entry_is_recomputed_not_trusted(tmp_path, model_config, tokenizer, image_paths):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    root = tmp_path / "cache"
    cache = FeatureCache(root, model.vision)
    reader, _ = cache.build(image_paths, processor.load_image, progress=False)
    expected = {p: reader.load(p).clone() for p in image_paths}  # load may map the file
    truncated, flipped, garbage = (cache.entry_path(reader.digests[p]) for p in image_paths)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor data: the header still parses
    flipped.write_bytes(bytes(data))
    garbage.write_bytes(b"not a safetensors file")

    calls = count_encoded_images(model.vision)
    reader, report = FeatureCache(root, model.vision).build(image_paths, processor.load_image, progress=False)
    assert (report.corrupt, report.computed, report.reused, sum(calls)) == (3, 3, 0, 3)
    for path in image_paths:
        assert torch.equal(reader.load(path), expected[path])
    _, report = FeatureCache(root, model.vision).build(image_paths, processor.load_image, progress=False)
    assert (report.corrupt, report.reused) == (0, 3)


def test_an_interrupted_write_leaves_no_entry_and_no_temporary_file(tmp_path, model_config, tokenizer,
                                                                      image_paths, monkeypatch):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    cache = FeatureCache(tmp_path / "cache", model.vision)

    def killed(src, dst):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(features_mod.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.write_entry("ab" * 20, torch.zeros(cache.shape))
    monkeypatch.undo()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    reader, report = cache.build(image_paths, processor.load_image, progress=False)
    assert report.computed == 3


def test_unreadable_images_are_skipped_and_counted_with_the_cache_on(tmp_path, model_config, tokenizer,
                                                                       image_paths):
    model = frozen_model(model_config, tokenizer)
    processor = processor_of(model, tokenizer, model_config)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "missing.png")
    paths = image_paths + [str(broken), missing]
    samples = samples_for(paths)
    reader, report = FeatureCache(tmp_path / "cache", model.vision).build(
        [p for s in samples for p in s.images], processor.load_image, progress=False)
    assert (report.computed, report.failed) == (3, 2)
    assert any("broken.png" in m for m in report.failures) and any("missing.png" in m for m in report.failures)

    dataset = ConversationDataset(samples, processor, progress=False, image_features=reader.load)
    items = [dataset[i] for i in range(len(dataset))]
    # the two-image sample holds the missing image too
    assert [it is None for it in items] == [False, False, False, True, True, True, False]
    assert dataset.image_failures == 3
    batch = Collator(tokenizer.pad_token_id)(items)
    assert batch.input_ids.shape[0] == 4 and batch.image_kind == "features" and batch.images.shape[0] == 3
    assert batch.skipped == 3 and batch.num_samples == 4


# ---------------------------------------------------------------------------------------------
# refusals


def cached_stage(shapes, **fields):
    stage = {"train": {"vision": "frozen", "connector": "full", "llm": "frozen"},
             "data": [{"format": "coco_captions", "max_samples": 24,
                       "args": {"path": shapes["train"]["captions"], "image_root": shapes["train"]["image_root"]}}],
             "feature_cache": True, "learning_rate": 3e-3, "batch_size": 4, "max_steps": 4, "log_every": 1,
             "warmup_ratio": 0.0}
    stage.update(fields)
    return {"s": stage}


def test_config_validation_refuses_the_cache_when_the_encoder_cannot_be_cached(tmp_path, tokenizer_dir,
                                                                                shapes_data, monkeypatch):
    full = cached_stage(shapes_data, train={"vision": "full", "connector": "full", "llm": "frozen"})
    with pytest.raises(ConfigError, match=r"^stages\.s\.feature_cache: needs train\.vision: frozen.*'full'"):
        run_config(tmp_path, tokenizer_dir, full)
    with pytest.raises(ConfigError, match=r"stages\.s\.feature_cache: needs train\.vision: frozen"):
        run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data, feature_cache=False),
                   overrides=["stages.s.feature_cache=true", "stages.s.train.vision=full"])
    monkeypatch.setattr(MLPProjector, "feature_cache_conflict",
                        classmethod(lambda cls: "runs the vision encoder itself and cannot read cached features"))
    with pytest.raises(ConfigError, match=r"stages\.s\.feature_cache: connector MLPProjector runs the vision"):
        run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data))
    monkeypatch.undo()
    monkeypatch.setattr(LanguageModeling, "needs_pixels", True)
    with pytest.raises(ConfigError, match=r"stages\.s\.feature_cache: objective 'lm' reads the images"):
        run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data))
    monkeypatch.undo()
    run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data))  # the valid stage loads


def test_the_runtime_refuses_the_cache_when_the_encoder_trains(tmp_path, tokenizer_dir, tokenizer, shapes_data,
                                                                model_config, monkeypatch):
    cfg = run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data))
    cfg.stages.s.train.vision = Train.full  # past validation, as a programmatic caller could
    with pytest.raises(FeatureCacheError, match=r"stages\.s\.feature_cache: needs train\.vision: frozen"):
        vlm.app.stages.run_stage(cfg, "s")

    model = build_tiny_model(model_config, tokenizer)  # every parameter trainable
    with pytest.raises(FeatureCacheError, match="trainable"):
        FeatureCache(tmp_path / "cache", model.vision)
    with pytest.raises(FeatureCacheError, match=r"stages\.x\.feature_cache: the vision encoder trains"):
        check_feature_cache(model, None, "stages.x.feature_cache")
    model.vision.requires_grad_(False)
    check_feature_cache(model, LanguageModeling(model, tokenizer), "w")
    monkeypatch.setattr(type(model.connector), "feature_cache_conflict",
                        classmethod(lambda cls: "runs the vision encoder itself and cannot read cached features"))
    with pytest.raises(FeatureCacheError, match="cannot read cached features"):
        check_feature_cache(model, None, "w")


# ---------------------------------------------------------------------------------------------
# through run_stage: no encoder call in training, the live encoder's losses, exact resume


def read_losses(folder: Path):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_run_stage_trains_from_the_cache_with_the_live_losses_and_resumes_exactly(
        tmp_path, tokenizer_dir, shapes_data, monkeypatch):
    encoded: list = []
    original = HFCLIPVisionEncoder.forward

    def counting(self, pixel_values):
        encoded.append(pixel_values.shape[0])
        return original(self, pixel_values)

    monkeypatch.setattr(HFCLIPVisionEncoder, "forward", counting)
    cache_dir = str(tmp_path / "shared_cache")
    cfg_a = run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data, save_every=2, feature_cache_dir=cache_dir),
                       out_dir=tmp_path / "A")
    captured = []
    original_build = vlm.app.stages.build_stage

    def keep_run(*args, **kwargs):
        captured.append(original_build(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(vlm.app.stages, "build_stage", keep_run)
    vlm.app.stages.run_stage(cfg_a, "s")
    report = captured[-1].feature_cache
    assert report.computed == report.images > 0
    assert sum(encoded) == report.computed, "the encoder ran during training"
    losses_a = read_losses(tmp_path / "A" / "s")
    assert list(losses_a) == [1, 2, 3, 4]

    # the same stage with the encoder running: the same losses
    encoded.clear()
    cfg_live = run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data, feature_cache=False),
                          out_dir=tmp_path / "live")
    vlm.app.stages.run_stage(cfg_live, "s")
    assert sum(encoded) >= 4 * 4
    losses_live = read_losses(tmp_path / "live" / "s")
    for step in losses_a:
        assert losses_a[step] == pytest.approx(losses_live[step], rel=1e-5, abs=1e-6), step

    # resume from A's step-2 checkpoint in another folder, sharing the cache: the encoder never
    # runs, and steps 3 and 4 repeat A's losses exactly
    encoded.clear()
    cfg_b = run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data, save_every=2, feature_cache_dir=cache_dir),
                       out_dir=tmp_path / "B")
    step_2 = Path("s") / "checkpoints" / "step_0000002"
    shutil.copytree(tmp_path / "A" / step_2, tmp_path / "B" / step_2)
    vlm.app.stages.run_stage(cfg_b, "s", resume=True)
    assert encoded == [] and captured[-1].feature_cache.reused == report.images
    losses_b = read_losses(tmp_path / "B" / "s")
    assert list(losses_b) == [3, 4]
    assert [losses_b[s] for s in (3, 4)] == [losses_a[s] for s in (3, 4)]


# ---------------------------------------------------------------------------------------------
# the benchmark command (a smoke test: it runs and reports both modes; no timing is asserted)


def test_vlm_bench_feature_cache_reports_both_modes_as_json(tmp_path, tokenizer_dir, shapes_data, capsys):
    from vlm.app.cli import main

    run_config(tmp_path, tokenizer_dir, cached_stage(shapes_data, feature_cache=False))
    recipe = tmp_path / "recipe_0.yaml"
    main(["bench", "feature-cache", str(recipe), "--stage", "s", "--steps", "2", "--warmup", "1",
          "--repeats", "2", "--out", str(tmp_path / "bench")])
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "s" and result["steps"] == 2
    for mode in ("encoder", "cache"):
        assert [r["samples"] for r in result[mode]["runs"]] == [2 * 4, 2 * 4]
        assert result[mode]["samples_per_s"] > 0 and result[mode]["samples_per_cpu_s"] > 0
    cold, warm = result["cache"]["builds"]
    assert cold["computed"] == cold["images"] > 0 and (warm["computed"], warm["reused"]) == (0, cold["images"])
    assert result["speedup"] == pytest.approx(result["cache"]["samples_per_s"] / result["encoder"]["samples_per_s"],
                                              rel=1e-2)
    assert (tmp_path / "bench" / "bench_feature_cache" / "cache" / "final" / "manifest.json").is_file()

    with pytest.raises(SystemExit) as exit_info:  # a stage whose encoder trains is refused, status 2
        main(["bench", "feature-cache", str(recipe), "--stage", "s", "stages.s.train.vision=full",
              "--out", str(tmp_path / "bench")])
    assert exit_info.value.code == 2
    assert "stages.s.feature_cache: needs train.vision: frozen" in capsys.readouterr().err
