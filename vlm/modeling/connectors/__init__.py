"""Connectors. Importing this package registers every built-in connector."""

from vlm.modeling.connectors.base import Connector
from vlm.modeling.connectors.registry import CONNECTORS
from vlm.modeling.connectors import beit3_query, mlp, qformer  # noqa: F401  (registration)


def build_connector(cfg, vision_dim: int, llm_dim: int, tokenizer=None) -> Connector:
    """Build the connector named by ``cfg.name`` for the given widths; a connector with its own
    text path (``takes_tokenizer``) also gets ``tokenizer`` (the LLM's)."""
    connector_cls = CONNECTORS.get(cfg.name)
    if connector_cls.takes_tokenizer:
        return connector_cls.from_config(dict(cfg.options), vision_dim, llm_dim, tokenizer=tokenizer)
    return connector_cls.from_config(dict(cfg.options), vision_dim, llm_dim)


__all__ = ["Connector", "CONNECTORS", "build_connector"]
