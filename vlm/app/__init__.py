"""The application: the ``vlm`` command, the composition root, stages, recipes, benchmarks."""
