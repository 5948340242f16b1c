"""Regional compilation of a training stage (``stages.<name>.compile: true``).

The repeated blocks of the model (every ``nn.ModuleList`` whose children share one class: the
LLM's decoder layers, the vision encoder's layers, a Q-Former's layers; accelerate's
``is_repeated_blocks``) are compiled in place with ``torch.compile`` (inductor, dynamic
shapes), PyTorch's "regional compilation" recipe: one compiled graph serves every layer of a
kind, packed rows of any length reuse it, and the glue around the blocks (embedding, image
scattering, masks, loss) stays eager. Parameters and state-dict names do not change, so
checkpoints are the same. Compiling happens on the first step (tens of seconds on a CPU core);
evaluation callbacks run eagerly (:func:`eager`), and the blocks are restored to eager modules
when training ends.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
from accelerate.utils.other import is_repeated_blocks
from torch import nn


def compile_repeated_blocks(model: nn.Module) -> List[nn.Module]:
    """Compile each block of every repeated-block list of ``model`` in place (outermost lists
    only); returns the compiled blocks."""
    blocks: List[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if is_repeated_blocks(module):
            for block in module:
                block.compile(dynamic=True)
                blocks.append(block)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return blocks


def restore_eager(blocks: List[nn.Module]) -> None:
    """Undo :func:`compile_repeated_blocks` (the inverse of ``nn.Module.compile``)."""
    for block in blocks:
        block._compiled_call_impl = None


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside the block (evaluation between training steps: no
    gradients, a KV cache, shapes the training graphs were not compiled for)."""
    with torch.compiler.set_stance("force_eager"):
        yield
