"""Connectors: token counts, pooling and the options they accept."""

import types

import pytest
import torch

from vlm.config import ConnectorConfig
from vlm.modeling.connectors import CONNECTORS, BuildContext, build_connector


def test_tokenwise_projectors_keep_one_token_per_patch():
    for name in ("linear", "mlp2x_gelu"):
        connector = build_connector(ConnectorConfig(name=name), BuildContext(vision_dim=8, llm_dim=12))
        out = connector(torch.randn(3, 16, 8))
        assert connector.num_tokens(16) == 16
        assert out.shape == (3, 16, 12)


def test_pooling_averages_each_grid_cell_before_projecting():
    torch.manual_seed(0)
    pooled = CONNECTORS.get("linear")(8, 12, pool=2)
    plain = CONNECTORS.get("linear")(8, 12)
    plain.load_state_dict(pooled.state_dict())
    features = torch.randn(2, 16, 8)  # a 4x4 grid, row-major
    grid = plain(features).reshape(2, 4, 4, 12)
    # a linear map commutes with the mean: each pooled token is the mean of its 2x2 cell
    expected = torch.stack([grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    assert pooled.num_tokens(16) == 4
    assert torch.allclose(pooled(features), expected, atol=1e-6)


def test_pooling_refuses_a_grid_that_is_not_square():
    connector = CONNECTORS.get("mlp2x_gelu")(8, 12, pool=2)
    with pytest.raises(ValueError, match="square patch grid"):
        connector.num_tokens(17)  # 16 patches + CLS


@pytest.mark.parametrize("pool", [None, 2])
def test_global_token_is_the_projected_mean_in_front(pool):
    torch.manual_seed(0)
    summary = CONNECTORS.get("mlp2x_gelu")(8, 12, pool=pool, global_token=True)
    plain = CONNECTORS.get("mlp2x_gelu")(8, 12, pool=pool)
    plain.load_state_dict(summary.state_dict())
    features = torch.randn(2, 16, 8)
    out = summary(features)
    assert summary.num_tokens(16) == plain.num_tokens(16) + 1 == out.shape[1]
    torch.testing.assert_close(out[:, 1:], plain(features))
    torch.testing.assert_close(out[:, :1], summary.proj(features.mean(dim=1, keepdim=True)))


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "linear"])
def test_position_embedding_tells_equal_cells_apart(connector):
    torch.manual_seed(0)
    placed = CONNECTORS.get(connector)(8, 12, pool=2, global_token=True, position_embedding=True, num_patches=16)
    plain = CONNECTORS.get(connector)(8, 12, pool=2, global_token=True)
    plain.load_state_dict({k: v for k, v in placed.state_dict().items() if k != "position"})
    features = torch.randn(1, 1, 8).expand(2, 16, 8)  # every patch the same: the cells differ only by position
    out = placed(features)
    assert placed.position.shape == (5, 12)
    torch.testing.assert_close(out, plain(features) + placed.position)
    assert not torch.allclose(out[:, 1], out[:, 2])
    every_patch = CONNECTORS.get(connector)(8, 12, position_embedding=True, num_patches=16)
    with pytest.raises(ValueError, match="built for 16 visual tokens; these features give 64"):
        every_patch(torch.randn(1, 64, 8))  # an image of another size than the encoder was built for


def test_position_embedding_from_config_needs_the_encoder():
    ctx = BuildContext(vision_dim=8, llm_dim=12, vision=types.SimpleNamespace(num_patches=64))
    connector = build_connector(ConnectorConfig(name="mlp2x_gelu", options={"pool": 4, "position_embedding": True}),
                                ctx)
    assert connector.position.shape == (16, 12)
    with pytest.raises(ValueError, match="position_embedding needs the encoder's number of patches"):
        build_connector(ConnectorConfig(name="linear", options={"position_embedding": True}),
                        BuildContext(vision_dim=8, llm_dim=12))


def test_global_token_option_from_config():
    connector = build_connector(ConnectorConfig(name="mlp2x_gelu", options={"pool": 4, "global_token": True}),
                                BuildContext(vision_dim=8, llm_dim=12))
    assert connector.num_tokens(64) == 17
