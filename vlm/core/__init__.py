"""The ground floor: registries, user-facing errors, plugins, hardware, quiet third-party output."""
