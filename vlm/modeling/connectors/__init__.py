"""Connectors. Importing this package registers every built-in connector."""

from vlm.modeling.connectors.base import Connector
from vlm.modeling.connectors.registry import CONNECTORS
from vlm.modeling.connectors import mlp  # noqa: F401  (registration)


def build_connector(cfg, vision_dim: int, llm_dim: int) -> Connector:
    """Build the connector named by ``cfg.name`` for the given widths."""
    return CONNECTORS.get(cfg.name).from_config(dict(cfg.options), vision_dim, llm_dim)


__all__ = ["Connector", "CONNECTORS", "build_connector"]
