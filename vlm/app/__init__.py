"""The application: the ``vlm`` command, the composition root (registries, validation), stages and recipes, benchmarks."""
