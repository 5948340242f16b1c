"""Convert CLIP ViT vision-tower weights between open_clip, transformers and timm.

The three libraries hold the same network under different names:

- open_clip ``VisionTransformer`` (``model.visual``): ``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.i.{ln_1, attn.in_proj_*,
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``proj`` (D x E);
- transformers ``CLIPVisionModel``: ``embeddings.*``, ``pre_layrnorm`` (sic),
  ``encoder.layers.i.*`` with separate ``q/k/v_proj``, ``post_layernorm``; the same under
  ``vision_model.`` in ``CLIPVisionModelWithProjection`` (and in checkpoints written by
  transformers 4), whose projection is ``visual_projection`` (E x D);
- timm ``VisionTransformer`` (``vit_*_clip_*``): ``patch_embed.proj``, ``cls_token`` (1 x 1 x D),
  ``pos_embed`` (1 x L x D), ``norm_pre``, ``blocks.i.{norm1, attn.qkv, attn.proj, norm2,
  mlp.fc1, mlp.fc2}``, ``norm``, the projection as ``head`` (E x D, zero bias).

Every function takes and returns a plain state dict (tensors are shared, not copied) and raises
KeyError naming the keys it does not know, so a checkpoint is never converted half-way. open_clip's
layout is the hub: ``hf_to_timm`` is ``open_clip_to_timm(hf_to_open_clip(...))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

StateDict = Dict[str, torch.Tensor]

# per-block tensors that only change name: (open_clip, transformers, timm), suffixes .weight / .bias
_BLOCK_RENAMES: List[Tuple[str, str, str]] = [
    ("ln_1", "layer_norm1", "norm1"),
    ("attn.out_proj", "self_attn.out_proj", "attn.proj"),
    ("ln_2", "layer_norm2", "norm2"),
    ("mlp.c_fc", "mlp.fc1", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2", "mlp.fc2"),
]
# tensors outside the blocks that only change name
_TOP_RENAMES: List[Tuple[str, str, str]] = [
    ("conv1.weight", "embeddings.patch_embedding.weight", "patch_embed.proj.weight"),
    ("ln_pre.weight", "pre_layrnorm.weight", "norm_pre.weight"),
    ("ln_pre.bias", "pre_layrnorm.bias", "norm_pre.bias"),
    ("ln_post.weight", "post_layernorm.weight", "norm.weight"),
    ("ln_post.bias", "post_layernorm.bias", "norm.bias"),
]
_HF_PREFIX = "vision_model."
_HF_IGNORED = {"embeddings.position_ids"}  # a buffer in older transformers versions

OPEN_CLIP, HF, TIMM = 0, 1, 2
# each layout's blocks: (a key of block i -> (i, the name inside the block), the prefix of block i)
_BLOCKS = {
    OPEN_CLIP: (re.compile(r"transformer\.resblocks\.(\d+)\.(.+)"), "transformer.resblocks.{}."),
    HF: (re.compile(r"encoder\.layers\.(\d+)\.(.+)"), "encoder.layers.{}."),
    TIMM: (re.compile(r"blocks\.(\d+)\.(.+)"), "blocks.{}."),
}
_KINDS = ("weight", "bias")
_QKV = ("q", "k", "v")  # the order of the fused in_proj / qkv tensors


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t()


def _zero_bias(tensor: torch.Tensor) -> None:
    if bool(tensor.any()):
        raise ValueError("timm head.bias is not zero; CLIP's projection has no bias")


@dataclass(frozen=True)
class _Third:
    """Splits a fused q/k/v tensor: its ``index``-th third (dim 0)."""

    index: int

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.chunk(3, dim=0)[self.index]


@dataclass(frozen=True)
class _QKVPart:
    """Not a function: the ``part`` (q, k or v) of the ``kind`` (weight or bias) that the
    conversion concatenates, in ``_QKV`` order, into the target once it has all three."""

    part: str
    kind: str


# (source name, target name, how): a tensor that changes more than its name, per conversion
# (source, target); outside the blocks, then inside them (names after the block prefix). One
# source name may give several targets; a target None only checks the tensor.
_Row = Tuple[str, Optional[str], Callable]
_TOP_SPECIAL: Dict[Tuple[int, int], List[_Row]] = {
    (OPEN_CLIP, HF): [("class_embedding", "embeddings.class_embedding", _same),
                      ("positional_embedding", "embeddings.position_embedding.weight", _same),
                      ("proj", "visual_projection.weight", _transposed)],
    (HF, OPEN_CLIP): [("embeddings.class_embedding", "class_embedding", _same),
                      ("embeddings.position_embedding.weight", "positional_embedding", _same),
                      ("visual_projection.weight", "proj", _transposed)],
    (OPEN_CLIP, TIMM): [("class_embedding", "cls_token", lambda t: t.reshape(1, 1, -1)),
                        ("positional_embedding", "pos_embed", lambda t: t.unsqueeze(0)),
                        ("proj", "head.weight", _transposed),
                        ("proj", "head.bias", lambda t: torch.zeros(t.shape[1], dtype=t.dtype))],
    (TIMM, OPEN_CLIP): [("cls_token", "class_embedding", lambda t: t.reshape(-1)),
                        ("pos_embed", "positional_embedding", lambda t: t.squeeze(0)),
                        ("head.weight", "proj", _transposed),
                        ("head.bias", None, _zero_bias)],
}
_BLOCK_SPECIAL: Dict[Tuple[int, int], List[_Row]] = {
    (OPEN_CLIP, HF): [(f"attn.in_proj_{kind}", f"self_attn.{name}_proj.{kind}", _Third(i))
                      for kind in _KINDS for i, name in enumerate(_QKV)],
    (HF, OPEN_CLIP): [(f"self_attn.{name}_proj.{kind}", f"attn.in_proj_{kind}", _QKVPart(name, kind))
                      for kind in _KINDS for name in _QKV],
    # timm fuses q, k, v in open_clip's order
    (OPEN_CLIP, TIMM): [(f"attn.in_proj_{kind}", f"attn.qkv.{kind}", _same) for kind in _KINDS],
    (TIMM, OPEN_CLIP): [(f"attn.qkv.{kind}", f"attn.in_proj_{kind}", _same) for kind in _KINDS],
}


def _table(rows: List[_Row]) -> Dict[str, List[Tuple[Optional[str], Callable]]]:
    table: Dict[str, List[Tuple[Optional[str], Callable]]] = {}
    for source, target, how in rows:
        table.setdefault(source, []).append((target, how))
    return table


# per conversion: (top-level table, block table), each source name -> [(target name, how)]
_TABLES = {
    (source, target): (
        _table([(names[source], names[target], _same) for names in _TOP_RENAMES] + _TOP_SPECIAL[(source, target)]),
        _table([(f"{names[source]}.{p}", f"{names[target]}.{p}", _same) for names in _BLOCK_RENAMES for p in _KINDS]
               + _BLOCK_SPECIAL[(source, target)]),
    )
    for source, target in _TOP_SPECIAL
}


def _unknown(keys) -> KeyError:
    keys = sorted(keys)
    return KeyError(f"not a CLIP ViT tensor in this layout: {keys[:5]}{'...' if len(keys) > 5 else ''}")


def _convert(state: StateDict, source: int, target: int, ignored=frozenset()) -> StateDict:
    """``state`` from layout ``source`` to ``target`` by ``_TABLES`` (keys in ``ignored`` are
    left out); KeyError naming the keys no table row reads, or for an incomplete q/k/v."""
    top, block = _TABLES[(source, target)]
    pattern, prefix = _BLOCKS[source][0], _BLOCKS[target][1]
    out, left = {}, set(state) - set(ignored)
    qkv: Dict[str, Tuple[str, str, Dict[str, torch.Tensor]]] = {}  # target key -> (layer, kind, parts)
    for key, value in state.items():
        if key in ignored:
            continue
        match = pattern.fullmatch(key)
        if key in top:
            layer, rows, at = None, top[key], ""
        elif match and match.group(2) in block:
            layer, rows, at = match.group(1), block[match.group(2)], prefix.format(match.group(1))
        else:
            continue
        for name, how in rows:
            if isinstance(how, _QKVPart):
                qkv.setdefault(at + name, (layer, how.kind, {}))[2][how.part] = value
            elif name is None:
                how(value)
            else:
                out[at + name] = how(value)
        left.discard(key)
    for key, (layer, kind, parts) in qkv.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"layer {layer}: {kind} of q/k/v incomplete (have {sorted(parts)})")
        out[key] = torch.cat([parts[name] for name in _QKV])
    if left:
        raise _unknown(left)
    return out


def open_clip_to_hf(state: StateDict, with_projection: bool = False) -> StateDict:
    """open_clip ``visual`` -> transformers ``CLIPVisionModel`` (``proj`` is dropped: it has
    none), or with ``with_projection`` ``CLIPVisionModelWithProjection`` (``vision_model.*`` and
    ``proj`` as ``visual_projection``)."""
    out = _convert(state, OPEN_CLIP, HF, ignored=() if with_projection else {"proj"})
    if with_projection:
        out = {k if k == "visual_projection.weight" else _HF_PREFIX + k: v for k, v in out.items()}
    return out


def hf_to_open_clip(state: StateDict) -> StateDict:
    """transformers ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (keys with or
    without ``vision_model.``) -> open_clip ``visual``."""
    state = {k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k: v for k, v in state.items()}
    return _convert(state, HF, OPEN_CLIP, ignored=_HF_IGNORED)


def open_clip_to_timm(state: StateDict) -> StateDict:
    """open_clip ``visual`` -> timm ``VisionTransformer`` (``proj`` becomes ``head``)."""
    return _convert(state, OPEN_CLIP, TIMM)


def timm_to_open_clip(state: StateDict) -> StateDict:
    """timm ``VisionTransformer`` -> open_clip ``visual`` (``head`` becomes ``proj``; its bias
    must be zero, as CLIP's projection has none)."""
    return _convert(state, TIMM, OPEN_CLIP)


def hf_to_timm(state: StateDict) -> StateDict:
    """transformers ``CLIPVisionModel`` -> timm ``VisionTransformer``."""
    return open_clip_to_timm(hf_to_open_clip(state))


def timm_to_hf(state: StateDict, with_projection: bool = False) -> StateDict:
    """timm ``VisionTransformer`` -> transformers ``CLIPVisionModel`` (see ``open_clip_to_hf``)."""
    return open_clip_to_hf(timm_to_open_clip(state), with_projection=with_projection)


CONVERTERS: Dict[Tuple[str, str], Callable[[StateDict], StateDict]] = {
    ("open_clip", "hf_clip"): open_clip_to_hf,
    ("hf_clip", "open_clip"): hf_to_open_clip,
    ("open_clip", "timm_vit"): open_clip_to_timm,
    ("timm_vit", "open_clip"): timm_to_open_clip,
    ("hf_clip", "timm_vit"): hf_to_timm,
    ("timm_vit", "hf_clip"): timm_to_hf,
}


def convert_clip_vision(state: StateDict, source: str, target: str) -> StateDict:
    """Convert a CLIP vision-tower state dict between encoder layouts named as in the
    registry: ``open_clip``, ``hf_clip``, ``timm_vit``."""
    if source == target:
        return dict(state)
    try:
        return CONVERTERS[(source, target)](state)
    except KeyError as exc:
        if (source, target) not in CONVERTERS:
            known = sorted({s for s, _ in CONVERTERS})
            raise ValueError(f"no CLIP weight conversion from '{source}' to '{target}'; known layouts: "
                             f"{', '.join(known)}") from None
        raise exc
