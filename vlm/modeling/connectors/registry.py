"""The registry of connectors, by exact name."""

from vlm.registry import Registry

CONNECTORS: Registry = Registry("connector")
