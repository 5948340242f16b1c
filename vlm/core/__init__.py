"""The ground floor: exact-name registries, the user-facing errors, plugin loading, quieting third-party noise."""
