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
from typing import Callable, Dict, List, Tuple

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
_OC_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_PREFIX = "vision_model."
_HF_IGNORED = {"embeddings.position_ids"}  # a buffer in older transformers versions

OPEN_CLIP, HF, TIMM = 0, 1, 2


def _renamer(source: int, target: int) -> Dict[str, str]:
    table = {}
    for names in _TOP_RENAMES:
        table[names[source]] = names[target]
    return table


def _block_renamer(source: int, target: int) -> Dict[str, str]:
    return {f"{names[source]}.{p}": f"{names[target]}.{p}" for names in _BLOCK_RENAMES for p in ("weight", "bias")}


def _unknown(keys) -> KeyError:
    keys = sorted(keys)
    return KeyError(f"not a CLIP ViT tensor in this layout: {keys[:5]}{'...' if len(keys) > 5 else ''}")


def open_clip_to_hf(state: StateDict, with_projection: bool = False) -> StateDict:
    """open_clip ``visual`` -> transformers ``CLIPVisionModel`` (``proj`` is dropped: it has
    none), or with ``with_projection`` ``CLIPVisionModelWithProjection`` (``vision_model.*`` and
    ``proj`` as ``visual_projection``)."""
    out, left = {}, set(state)
    top, block = _renamer(OPEN_CLIP, HF), _block_renamer(OPEN_CLIP, HF)
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "class_embedding":
            out["embeddings.class_embedding"] = value
        elif key == "positional_embedding":
            out["embeddings.position_embedding.weight"] = value
        elif key == "proj":
            if with_projection:
                out["visual_projection.weight"] = value.t()
        elif match := _OC_BLOCK.fullmatch(key):
            i, rest = match.groups()
            prefix = f"encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
            elif rest in block:
                out[prefix + block[rest]] = value
            else:
                continue
        else:
            continue
        left.discard(key)
    if left:
        raise _unknown(left)
    if with_projection:
        out = {k if k == "visual_projection.weight" else _HF_PREFIX + k: v for k, v in out.items()}
    return out


def hf_to_open_clip(state: StateDict) -> StateDict:
    """transformers ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (keys with or
    without ``vision_model.``) -> open_clip ``visual``."""
    state = {k[len(_HF_PREFIX):] if k.startswith(_HF_PREFIX) else k: v for k, v in state.items()}
    out, left = {}, set(state) - _HF_IGNORED
    top, block = _renamer(HF, OPEN_CLIP), _block_renamer(HF, OPEN_CLIP)
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_IGNORED:
            continue
        if key in top:
            out[top[key]] = value
        elif key == "embeddings.class_embedding":
            out["class_embedding"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.t()
        elif match := _HF_BLOCK.fullmatch(key):
            i, rest = match.groups()
            attn = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if attn:
                qkv.setdefault((i, attn.group(2)), {})[attn.group(1)] = value
            elif rest in block:
                out[f"transformer.resblocks.{i}.{block[rest]}"] = value
            else:
                continue
        else:
            continue
        left.discard(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"layer {i}: {kind} of q/k/v incomplete (have {sorted(parts)})")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if left:
        raise _unknown(left)
    return out


def open_clip_to_timm(state: StateDict) -> StateDict:
    """open_clip ``visual`` -> timm ``VisionTransformer`` (``proj`` becomes ``head``)."""
    out, left = {}, set(state)
    top, block = _renamer(OPEN_CLIP, TIMM), _block_renamer(OPEN_CLIP, TIMM)
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key == "proj":
            out["head.weight"] = value.t()
            out["head.bias"] = torch.zeros(value.shape[1], dtype=value.dtype)
        elif match := _OC_BLOCK.fullmatch(key):
            i, rest = match.groups()
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # same q, k, v order
                out[f"blocks.{i}.attn.qkv.{rest.rsplit('_', 1)[1]}"] = value
            elif rest in block:
                out[f"blocks.{i}.{block[rest]}"] = value
            else:
                continue
        else:
            continue
        left.discard(key)
    if left:
        raise _unknown(left)
    return out


def timm_to_open_clip(state: StateDict) -> StateDict:
    """timm ``VisionTransformer`` -> open_clip ``visual`` (``head`` becomes ``proj``; its bias
    must be zero, as CLIP's projection has none)."""
    out, left = {}, set(state)
    top, block = _renamer(TIMM, OPEN_CLIP), _block_renamer(TIMM, OPEN_CLIP)
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "cls_token":
            out["class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["positional_embedding"] = value.squeeze(0)
        elif key == "head.weight":
            out["proj"] = value.t()
        elif key == "head.bias":
            if bool(value.any()):
                raise ValueError("timm head.bias is not zero; CLIP's projection has no bias")
        elif match := _TIMM_BLOCK.fullmatch(key):
            i, rest = match.groups()
            if rest in ("attn.qkv.weight", "attn.qkv.bias"):
                out[f"transformer.resblocks.{i}.attn.in_proj_{rest.rsplit('.', 1)[1]}"] = value
            elif rest in block:
                out[f"transformer.resblocks.{i}.{block[rest]}"] = value
            else:
                continue
        else:
            continue
        left.discard(key)
    if left:
        raise _unknown(left)
    return out


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
