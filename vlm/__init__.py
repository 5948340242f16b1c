"""vlm: a research framework for vision-language models."""

__version__ = "0.1.0"
