"""Silence known-harmless third-party warnings in the ``vlm`` command (not in library use).

Deprecation notices from transformers / peft / accelerate / timm / open_clip / torchscale (e.g.
transformers' "`is_gradient_checkpointing` is deprecated", "`torch_dtype` is deprecated") and
transformers' logger below ERROR say nothing a vlm user can act on. Warnings raised by vlm itself,
and every other category, stay visible. ``VLM_SHOW_WARNINGS=1`` keeps everything.
"""

from __future__ import annotations

import os
import warnings

THIRD_PARTY = r"(transformers|peft|accelerate|timm|open_clip|torchscale|huggingface_hub|tokenizers)(\.|$)"
HARMLESS_MESSAGES = (
    r"The following generation flags are not valid and may be ignored",
    r".*`torch_dtype` is deprecated",
)


def silence_third_party_warnings() -> bool:
    """Install the filters (unless ``VLM_SHOW_WARNINGS=1``); returns whether it did."""
    if os.environ.get("VLM_SHOW_WARNINGS") == "1":
        return False
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=THIRD_PARTY)
    for message in HARMLESS_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fork notice of tokenizers
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return True
