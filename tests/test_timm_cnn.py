"""The ``timm_cnn`` encoder: a timm CNN's feature stage as patch tokens (equal to timm's own
feature map, row by row), its normalisation from timm's pretrained config, weights from a local
file, a clear error for a stage the network does not have, and a model that trains and reloads."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import answer_words_stage, run_config
from safetensors.torch import save_file

from vlm.config import VisionConfig
from vlm.core.errors import ConfigError
from vlm.modeling.vision import build_vision_encoder
from vlm.training.callbacks import Callback


def config(**options):
    return VisionConfig(name="timm_cnn", options={"model_name": "resnet10t", "image_size": 64, **options})


def test_tokens_are_the_feature_map_row_by_row():
    torch.manual_seed(0)
    enc = build_vision_encoder(config()).eval()
    reference = timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=(2,)).eval()
    reference.load_state_dict(enc.model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, fmap = enc(pixels), reference(pixels)[0]
    assert fmap.shape == (2, 128, 8, 8)
    assert enc.num_patches == 64 and enc.embed_dim == 128 and enc.image_size == 64
    torch.testing.assert_close(got[:, 8 * 3 + 5], fmap[:, :, 3, 5])  # token r*W+c is pixel (r, c)
    assert tuple(enc.mean) == timm.create_model("resnet10t").pretrained_cfg["mean"]


def test_channels_last_run_gives_timm_gradients():
    # forward() feeds the network channels-last (faster on CPU): the weights' gradients must not change
    torch.manual_seed(2)
    enc = build_vision_encoder(config())
    reference = timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=(2,))
    reference.load_state_dict(enc.model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    enc(pixels).square().mean().backward()
    reference(pixels)[0].square().mean().backward()
    for (name, ours), theirs in zip(enc.model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_channels_last_lever_changes_the_layout_not_the_features():
    torch.manual_seed(3)
    enc = build_vision_encoder(config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    seen = []
    enc.model.register_forward_pre_hook(lambda module, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        on = enc(pixels)
        enc.use_channels_last(False)
        off = enc(pixels)
    assert seen == [True, False]
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5)


def test_other_stage_other_grid():
    enc = build_vision_encoder(config(out_index=3))
    assert enc.num_patches == 16 and enc.embed_dim == 256


def test_missing_stage_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="out_index=9"):
        build_vision_encoder(config(out_index=9))


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    enc = build_vision_encoder(VisionConfig(name="timm_cnn", pretrained=str(path),
                                            options={"model_name": "resnet10t", "image_size": 64}))
    torch.testing.assert_close(enc.model.conv1[0].weight, source.conv1[0].weight)


def test_warms_up_with_answer_words_and_reloads(tmp_path, tokenizer_dir, shapes_data):
    """A CNN encoder behind a pooling connector: the vision warm-up lowers its loss and changes
    every encoder weight, and the saved stage reloads with the same features."""
    import vlm.app.stages
    from vlm.checkpoint.pretrained import load_pretrained

    stages = {"warmup": answer_words_stage(shapes_data["train"])}
    model = {"vision": {"name": "timm_cnn", "options": {"model_name": "resnet10t", "image_size": 32},
                        "preprocess": "resize"},
             "connector": {"name": "mlp2x_gelu", "options": {"pool": 2}}}
    cfg = run_config(tmp_path, tokenizer_dir, stages, model=model)
    pixels = torch.randn(2, 3, 32, 32)

    class Features(Callback):
        """The trained encoder's features (eval mode) as the stage ends."""

        def on_train_end(self, ctx, final):
            vision = ctx.model().vision
            was_training = vision.training
            vision.eval()
            with torch.no_grad():
                self.features = vision(pixels)
            vision.train(was_training)

    seen = Features()
    final = vlm.app.stages.run_stage(cfg, "warmup", callbacks=[seen])
    losses = [json.loads(line)["loss"] for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    reloaded, _, _ = load_pretrained(final, device="cpu")
    assert reloaded.num_image_tokens == 4  # 4x4 feature map pooled to 2x2
    with torch.no_grad():
        torch.testing.assert_close(reloaded.vision(pixels), seen.features)


def test_unknown_network_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="no_such_net"):
        build_vision_encoder(config(model_name="no_such_net"))
