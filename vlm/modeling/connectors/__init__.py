"""Connectors, by exact name in ``CONNECTORS`` (each imported on first use)."""

from vlm.modeling.connectors.base import BuildContext, Connector
from vlm.modeling.connectors.registry import CONNECTORS


def build_connector(cfg, ctx: BuildContext) -> Connector:
    """Build the connector named by ``cfg.name`` with its options for ``ctx`` (``Connector.build``)."""
    return CONNECTORS.get(cfg.name).build(cfg.options, ctx)


__all__ = ["BuildContext", "Connector", "CONNECTORS", "build_connector"]
