"""Decoded, transformed images kept in memory, so that a stage decodes each image once.

A stage that reads an image more than once (several epochs; a captions file with five captions
per image; questions sharing an image) decodes and transforms it again on every read; on 2 cores
that was 40% of the demo's vision warm-up step. The transforms are deterministic, so the tensor
they give can be kept. :class:`DecodedImageCache` keeps them by path up to a byte budget
(images past it are loaded as before, never evicted: no churn). Each DataLoader worker process
holds its own cache.
"""

from __future__ import annotations

import os
from typing import Callable, Dict

import torch

# at most this share of the machine's memory, and never more than MAX_BYTES, per process
MEMORY_SHARE = 0.25
MAX_BYTES = 8 * 1024 ** 3


def default_budget_bytes(processes: int = 1) -> int:
    """The cache budget of one of ``processes`` processes holding a cache: a quarter of the
    machine's memory (at most 8 GiB), shared between them."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: a conservative 1 GiB
        total = 4 * 1024 ** 3
    return int(min(total * MEMORY_SHARE, MAX_BYTES) // max(1, processes))


class DecodedImageCache:
    """Image tensors by path, loaded by ``load(path)`` on first use and kept while the cache
    holds fewer than ``max_bytes``; ``hits`` / ``misses`` count the reads."""

    def __init__(self, load: Callable[[str], torch.Tensor], max_bytes: int):
        self.load = load
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._images: Dict[str, torch.Tensor] = {}

    def __call__(self, path) -> torch.Tensor:
        """The transformed image at ``path`` (a shared tensor: callers must not change it in
        place); an image given in memory rather than by path is loaded and not kept."""
        if not isinstance(path, str):
            return self.load(path)
        image = self._images.get(path)
        if image is not None:
            self.hits += 1
            return image
        self.misses += 1
        image = self.load(path)
        size = image.numel() * image.element_size()
        if self.bytes + size <= self.max_bytes:
            self._images[path] = image
            self.bytes += size
        return image

    def __len__(self) -> int:
        return len(self._images)
