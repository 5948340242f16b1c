"""The ``beit3_query`` connector: queries through BEiT3's language expert and image tokens
through its vision expert (shown by perturbing one expert at a time), BOS/EOS initialisation,
refusal of other encoders (at build time and in config validation), and training in a model."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import LLM_ARCH, tiny_model_config

from vlm.app.wiring import load_run_config
from vlm.config import ConfigError, ConnectorConfig, VisionConfig
from vlm.modeling.connectors import BuildContext, build_connector
from vlm.modeling.connectors.beit3_query import BEiT3QueryConnector
from vlm.modeling.vision import build_vision_encoder
from vlm.modeling.vlm import VisionLanguageModel

S, DIM, LAYERS = 32, 32, 2
BEIT3_ARCH = dict(img_size=S, patch_size=8, encoder_embed_dim=DIM, encoder_attention_heads=4,
                  encoder_ffn_embed_dim=64, encoder_layers=LAYERS, vocab_size=50)
K = 6


def beit3(**fields):
    """A tiny BEiT3 whose linear weights have unit-scale outputs (std 1/sqrt(fan_in)): with
    unilm's 0.02 init, attention is nearly uniform and some paths are too faint to see."""
    torch.manual_seed(0)
    vision = build_vision_encoder(VisionConfig(name="beit3", arch=dict(BEIT3_ARCH), feature_layer=-1, **fields))
    with torch.no_grad():
        for module in vision.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features ** -0.5)
    return vision.eval()


def connector(vision, **options):
    torch.manual_seed(1)
    conn = build_connector(ConnectorConfig(name="beit3_query", options={"num_queries": K, **options}),
                           BuildContext(DIM, 24, vision=vision))
    return conn.eval()


def outputs(vision, conn, pixels):
    """(image-path features, query outputs) for the same pixels."""
    with torch.no_grad():
        return vision(pixels), vision.forward_with_queries(pixels, conn.queries)


def perturb(vision, name):
    with torch.no_grad():
        vision.beit3.get_parameter(name).add_(0.5)


def changed(a, b):
    return not torch.allclose(a, b, atol=1e-6, rtol=0)


def test_query_outputs_and_visual_tokens_have_the_expected_shapes():
    vision = beit3()
    conn = connector(vision)
    pixels = torch.randn(3, 3, S, S)
    assert conn.num_tokens(vision.num_patches) == K
    with torch.no_grad():
        assert vision.forward_with_queries(pixels, conn.queries).shape == (3, K, DIM)
        assert conn.encode_images(vision, pixels).shape == (3, K, 24)


def test_the_language_expert_reads_only_the_queries():
    vision = beit3()
    conn = connector(vision)
    pixels = torch.randn(2, 3, S, S)
    image0, queries0 = outputs(vision, conn, pixels)
    perturb(vision, "encoder.layers.0.ffn.B.fc1.weight")
    image1, queries1 = outputs(vision, conn, pixels)
    assert torch.equal(image0, image1), "the vision-only path never touches the language expert"
    assert changed(queries0, queries1)


def test_the_vision_expert_of_the_last_block_touches_only_image_tokens():
    """After the last attention, image tokens and queries no longer mix: the last block's vision
    FFN changes image features but leaves the query outputs bit for bit the same, and the last
    block's language FFN does the opposite."""
    vision = beit3()
    conn = connector(vision)
    pixels = torch.randn(2, 3, S, S)
    image0, queries0 = outputs(vision, conn, pixels)
    perturb(vision, f"encoder.layers.{LAYERS - 1}.ffn.A.fc2.weight")
    image1, queries1 = outputs(vision, conn, pixels)
    assert changed(image0, image1)
    assert torch.equal(queries0, queries1)
    perturb(vision, f"encoder.layers.{LAYERS - 1}.ffn.B.fc2.weight")
    image2, queries2 = outputs(vision, conn, pixels)
    assert torch.equal(image1, image2)
    assert changed(queries1, queries2)


def test_queries_attend_to_the_image_through_the_vision_expert():
    vision = beit3()
    conn = connector(vision)
    pixels = torch.randn(2, 3, S, S)
    _, queries0 = outputs(vision, conn, pixels)
    _, other_image = outputs(vision, conn, torch.randn(2, 3, S, S))
    assert changed(queries0, other_image), "query outputs depend on the image"
    perturb(vision, "encoder.layers.0.self_attn.v_proj.A.weight")  # image tokens' values only
    _, queries1 = outputs(vision, conn, pixels)
    assert changed(queries0, queries1)


def test_full_attention_among_the_queries():
    """Full attention among the queries: changing one query changes the others' outputs."""
    vision = beit3()
    conn = connector(vision)
    pixels = torch.randn(1, 3, S, S)
    with torch.no_grad():
        before = vision.forward_with_queries(pixels, conn.queries)
        edited = conn.queries.clone()
        edited[0] += 1.0
        after = vision.forward_with_queries(pixels, edited)
    assert changed(before[:, 1:], after[:, 1:])


def test_first_and_last_queries_start_from_beit3s_bos_and_eos_embeddings():
    vision = beit3()
    conn = connector(vision)
    text = vision.beit3.text_embed.weight
    assert torch.equal(conn.queries[0], text[0]) and torch.equal(conn.queries[-1], text[2])
    assert not torch.equal(conn.queries[1], text[1])
    plain = connector(vision, init_from_text=False)
    assert not torch.equal(plain.queries[0], text[0])
    custom = connector(vision, bos_token_id=5, eos_token_id=7)
    assert torch.equal(custom.queries[0], text[5]) and torch.equal(custom.queries[-1], text[7])


@pytest.mark.parametrize("projection,layers", [("linear", 1), ("mlp2x_gelu", 2)])
def test_projection_choices(projection, layers):
    conn = connector(beit3(), projection=projection)
    assert sum(isinstance(m, torch.nn.Linear) for m in conn.proj.modules()) == layers


def test_other_encoders_are_refused_with_a_clear_error():
    from conftest import VISION_ARCH

    clip = build_vision_encoder(VisionConfig(name="hf_clip", arch=dict(VISION_ARCH)))
    with pytest.raises(TypeError, match="'beit3_query' runs inside the 'beit3' vision encoder; got HFCLIP"):
        build_connector(ConnectorConfig(name="beit3_query"), BuildContext(32, 24, vision=clip))
    conn = build_connector(ConnectorConfig(name="beit3_query"), BuildContext(32, 24))
    with pytest.raises(TypeError, match="'beit3' vision encoder"):
        conn.encode_images(clip, torch.randn(1, 3, 32, 32))


def test_it_cannot_take_precomputed_features():
    assert "cannot read cached features" in BEiT3QueryConnector.feature_cache_conflict()


# ---------------------------------------------------------------------------------------------
# config validation and a model


def recipe(tmp_path, tokenizer_dir, vision: dict, connector_cfg: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"vision": vision, "connector": connector_cfg,
                  "llm": {"tokenizer": str(tokenizer_dir), "arch": dict(LLM_ARCH)}, "template": "plain"},
    }))
    return path


def test_validation_refuses_the_query_connector_on_another_encoder(tmp_path, tokenizer_dir):
    path = recipe(tmp_path, tokenizer_dir, {"name": "hf_clip"}, {"name": "beit3_query"})
    with pytest.raises(ConfigError, match=r"^model.connector.name: connector 'beit3_query' runs inside a 'beit3' "
                                          r"vision encoder; model.vision.name is 'hf_clip'"):
        load_run_config(path)
    ok = recipe(tmp_path, tokenizer_dir, {"name": "beit3", "arch": dict(BEIT3_ARCH)}, {"name": "beit3_query"})
    load_run_config(ok)


@pytest.mark.parametrize("override,message", [
    ("model.connector.options.projection=mlp", "model.connector.options.projection"),
    ("model.connector.options.num_querys=8", "did you mean 'num_queries'"),
    ("model.vision.options.size=huge", "model.vision.options.size"),
    ("model.vision.arch.encoder_layer=2", "did you mean 'encoder_layers'"),
])
def test_validation_of_the_new_options(tmp_path, tokenizer_dir, override, message):
    path = recipe(tmp_path, tokenizer_dir, {"name": "beit3", "arch": dict(BEIT3_ARCH)}, {"name": "beit3_query"})
    with pytest.raises(ConfigError, match=message):
        load_run_config(path, [override])


def test_timm_vit_needs_a_model_name(tmp_path, tokenizer_dir):
    path = recipe(tmp_path, tokenizer_dir, {"name": "timm_vit"}, {"name": "mlp2x_gelu"})
    with pytest.raises(ConfigError, match="^model.vision.options.model_name: required"):
        load_run_config(path)
    load_run_config(path, ["model.vision.options.model_name=vit_base_patch16_clip_224"])
    with pytest.raises(ConfigError, match="model.vision.arch.embed_dimm.*did you mean 'embed_dim'"):
        load_run_config(path, ["model.vision.options.model_name=x", "model.vision.arch.embed_dimm=8"])


def test_a_vlm_with_beit3_queries_trains_the_queries_through_the_frozen_encoder(tokenizer_dir, tokenizer):
    cfg = tiny_model_config(tokenizer_dir)
    cfg.vision = VisionConfig(name="beit3", arch=dict(BEIT3_ARCH), feature_layer=-1)
    cfg.connector = ConnectorConfig(name="beit3_query", options={"num_queries": K, "projection": "mlp2x_gelu"})
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(cfg, tokenizer)
    assert model.num_image_tokens == K
    text = model.vision.beit3.text_embed.weight
    assert torch.equal(model.connector.queries[0], text[0]), "from_config binds the encoder"
    for p in list(model.vision.parameters()) + list(model.llm.parameters()):
        p.requires_grad_(False)
    model.vision.eval()
    image = model.image_token_id
    ids = torch.tensor([[image] * K + [5, 6, 7, 8], [image] * K + [9, 10, 11, 12]])
    labels = ids.clone()
    labels[:, :K] = -100
    pixels = torch.randn(2, 3, S, S)
    optimizer = torch.optim.AdamW(model.connector.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.connector.queries.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.25, losses
