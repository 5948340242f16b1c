"""vlm <-> transformers' ``LlavaForConditionalGeneration``.

A vlm model in the LLaVA layout (``hf_clip`` encoder, ``mlp2x_gelu`` connector without pooling,
any transformers causal LM) and a transformers LLaVA model are the same network:

- ``to_hf_llava(model)`` builds the transformers model holding our weights. Our encoder already
  dropped the blocks after its feature layer, so the exported vision tower has only the kept
  blocks and reads ``vision_feature_layer=-1``; ``keep_cls`` becomes the ``full`` select strategy.
- ``from_hf_llava(llava, image_token_id)`` is the reverse: our components holding its weights.
- ``export_hf_llava(checkpoint, out)`` writes a stage output (``DIR/<stage>/final``) as a
  transformers LLaVA folder loadable as it is with ``LlavaForConditionalGeneration`` and
  ``AutoProcessor.from_pretrained`` (and by vLLM): safetensors in one dtype, the tokenizer, a
  ``LlavaImageProcessor`` doing vlm's preprocess strategy (``pad`` included), vlm's chat template
  as Jinja (``vlm.interop.chat_template``), ``processor_config.json`` and a
  ``generation_config.json`` stopping at the template's stop tokens.
- ``import_hf_llava(folder, out)`` writes a local transformers LLaVA folder as a vlm stage output:
  ``vision/`` and ``llm/`` (transformers folders), ``connector.safetensors``, ``model.yaml``,
  ``manifest.json`` and ``tokenizer/``, which ``vlm chat``, ``vlm eval --checkpoint`` and a
  recipe's ``init_from`` read (the recipe's ``model.vision.pretrained`` and
  ``model.llm.name_or_path`` then point at ``vision/`` and ``llm/``).

Prompts are not part of the network: a model exported from vlm carries vlm's chat template
(also named in ``vlm_export.json``), and one imported needs the template it was trained with.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedModel,
)

from vlm.checkpoint.manifest import MANIFEST
from vlm.checkpoint.output_dirs import check_output_dir, replacing_output_dir
from vlm.config import ModelConfig, VisionConfig
from vlm.core.errors import LayoutError as LlavaLayoutError
from vlm.interop import sub_state
from vlm.interop.chat_template import jinja_chat_template
from vlm.interop.hf_export import (
    EXPORT_INFO,
    generation_config,
    load_for_export,
    write_export,
)
from vlm.modeling.connectors.mlp import MLPProjector
from vlm.modeling.vision.hf_clip import HFCLIPVisionEncoder
from vlm.modeling.vlm import VisionLanguageModel

__all__ = ["EXPORT_INFO", "LlavaLayoutError", "build_llava_processor", "export_hf_llava", "from_hf_llava",
           "generation_config", "image_processor", "import_hf_llava", "to_hf_llava"]

logger = logging.getLogger(__name__)




def _check_layout(model: VisionLanguageModel) -> None:
    if not isinstance(model.vision, HFCLIPVisionEncoder):
        raise LlavaLayoutError(f"model.vision: transformers' LLaVA holds a CLIP vision tower (vlm 'hf_clip'); "
                               f"this model's encoder is {type(model.vision).__name__}")
    pool = getattr(model.connector, "pool", None)
    summary = getattr(model.connector, "global_token", False)
    positions = getattr(model.connector, "position", None) is not None
    if type(model.connector) is not MLPProjector or pool is not None or summary or positions:
        detail = f" with pool={pool}" if pool is not None else ""
        detail += " with global_token" if summary else ""
        detail += " with position_embedding" if positions else ""
        raise LlavaLayoutError("model.connector: transformers' LLaVA projector is Linear-GELU-Linear over every "
                               "patch (vlm 'mlp2x_gelu' without pool, global_token or position_embedding); "
                               "this model's connector is "
                               f"{type(model.connector).__name__}{detail}")
    if not isinstance(model.llm, PreTrainedModel) or model.llm.get_output_embeddings() is None:
        raise LlavaLayoutError(f"model.llm: needs a plain transformers causal LM (LoRA merged), got "
                               f"{type(model.llm).__name__}")


_PROJECTOR = (("proj.0", "linear_1"), ("proj.2", "linear_2"))  # (ours, transformers')


def _renamed(state: Dict[str, torch.Tensor], to_hf: bool) -> Dict[str, torch.Tensor]:
    """Projector weights between our ``MLPProjector`` and ``LlavaMultiModalProjector`` names."""
    pairs = [(ours, hf) if to_hf else (hf, ours) for ours, hf in _PROJECTOR]
    return {f"{dst}.{p}": state[f"{src}.{p}"] for src, dst in pairs for p in ("weight", "bias")
            if f"{src}.{p}" in state}


def to_hf_llava(model: VisionLanguageModel) -> LlavaForConditionalGeneration:
    """A ``LlavaForConditionalGeneration`` holding ``model``'s weights (fp32 copies on the CPU)."""
    _check_layout(model)
    vision = model.vision.model
    vision_config = CLIPVisionConfig(**{**vision.config.to_dict(),
                                        "num_hidden_layers": len(vision.encoder.layers)})
    text_config = model.llm.config.get_text_config()
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_id=model.image_token_id, image_seq_length=model.num_image_tokens,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="full" if model.vision.cfg.keep_cls else "default",
                         multimodal_projector_bias=model.connector.proj[0].bias is not None,
                         tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    llava = LlavaForConditionalGeneration(config)
    tower = {k: v for k, v in vision.state_dict().items() if not k.startswith("post_layernorm")}
    # our encoder never applies post_layernorm (LLaVA reads a hidden state before it): an identity
    tower["post_layernorm.weight"] = torch.ones(vision_config.hidden_size)
    tower["post_layernorm.bias"] = torch.zeros(vision_config.hidden_size)
    state = {f"model.vision_tower.{k}": v for k, v in tower.items()}
    state.update({f"model.multi_modal_projector.{k}": v
                  for k, v in _renamed(model.connector.state_dict(), to_hf=True).items()})
    state.update({f"model.language_model.{k}": v for k, v in model.llm.base_model.state_dict().items()})
    state["lm_head.weight"] = model.llm.get_output_embeddings().weight
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise LlavaLayoutError(f"weights do not fit transformers' LLaVA: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    return llava.eval()


def from_hf_llava(llava: LlavaForConditionalGeneration, image_token_id: Optional[int] = None) -> VisionLanguageModel:
    """Our ``VisionLanguageModel`` (``hf_clip`` + ``mlp2x_gelu`` + the causal LM) holding
    ``llava``'s weights."""
    config = llava.config
    if not isinstance(config.vision_feature_layer, int):
        raise LlavaLayoutError(f"vision_feature_layer={config.vision_feature_layer}: features from several "
                               "layers are not supported (vlm reads one layer)")
    if config.projector_hidden_act != "gelu":
        raise LlavaLayoutError(f"projector_hidden_act='{config.projector_hidden_act}': vlm's mlp2x_gelu uses gelu")
    if config.vision_feature_select_strategy not in ("default", "full"):
        raise LlavaLayoutError(f"vision_feature_select_strategy='{config.vision_feature_select_strategy}' "
                               "is not 'default' or 'full'")
    state = llava.state_dict()
    vision = CLIPVisionModel(config.vision_config)
    vision.load_state_dict(sub_state(state, "model.vision_tower."))
    encoder = HFCLIPVisionEncoder(VisionConfig(name="hf_clip", feature_layer=config.vision_feature_layer,
                                               keep_cls=config.vision_feature_select_strategy == "full"), vision)
    projector = sub_state(state, "model.multi_modal_projector.")
    connector = MLPProjector(config.vision_config.hidden_size, config.text_config.hidden_size,
                             bias="linear_1.bias" in projector)
    connector.load_state_dict(_renamed(projector, to_hf=False))
    llm = AutoModelForCausalLM.from_config(config.text_config)
    llm.base_model.load_state_dict(sub_state(state, "model.language_model."))
    llm.get_output_embeddings().weight.data.copy_(state["lm_head.weight"])
    token = config.image_token_id if image_token_id is None else image_token_id
    return VisionLanguageModel(encoder, connector, llm, token).eval()


def image_processor(strategy: str, image_size: int, mean, std) -> LlavaImageProcessor:
    """transformers' ``LlavaImageProcessor`` doing vlm's preprocess ``strategy`` (``resize``,
    ``pad``: LLaVA's expand-to-square, ``resize_center_crop``): bicubic, vlm's mean and std."""
    square = {"height": image_size, "width": image_size}
    common = dict(do_resize=True, resample=3, do_rescale=True, do_normalize=True, image_mean=list(mean),
                  image_std=list(std), do_convert_rgb=True, crop_size=square)  # resample 3: bicubic
    if strategy in ("resize", "pad"):
        return LlavaImageProcessor(size=square, do_center_crop=False, do_pad=strategy == "pad", **common)
    if strategy == "resize_center_crop":
        return LlavaImageProcessor(size={"shortest_edge": image_size}, do_center_crop=True, do_pad=False, **common)
    raise LlavaLayoutError(f"model.vision.preprocess: '{strategy}' has no transformers image processor")


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def export_chat_template(tokenizer, model_cfg, **options) -> str:
    """vlm's chat template of ``model_cfg`` as Jinja, with the model's image placement
    (``options``: :func:`~vlm.interop.chat_template.jinja_chat_template`'s others), set on
    ``tokenizer``, which then leaves the bos to the template."""
    template = jinja_chat_template(model_cfg.template, tokenizer, model_cfg.system_prompt, model_cfg.image_token,
                                   image_placement=model_cfg.get("image_placement"), **options)
    if "bos_token" in template and _adds_bos(tokenizer):
        # the template writes the bos itself (as vLLM and apply_chat_template(tokenize=True) expect)
        tokenizer.add_bos_token = False
        if _adds_bos(tokenizer):
            logger.warning("the tokenizer adds a bos token by itself and the chat template writes one: "
                           "tokenize rendered prompts with add_special_tokens=False")
    tokenizer.chat_template = template
    return template


def build_llava_processor(model: VisionLanguageModel, tokenizer, model_cfg) -> LlavaProcessor:
    """The ``LlavaProcessor`` of an exported model: vlm's image preprocessing, its chat template
    as Jinja, and the placeholder count ``(S / patch)^2 (+1 with keep_cls)`` as vlm expands."""
    template = export_chat_template(tokenizer, model_cfg)
    processor = LlavaProcessor(
        image_processor=image_processor(model_cfg.vision.preprocess or model.vision.default_preprocess,
                                        model.vision.image_size, model.vision.mean, model.vision.std),
        tokenizer=tokenizer, patch_size=model.vision.model.config.patch_size,
        vision_feature_select_strategy="full" if model.vision.cfg.keep_cls else "default",
        chat_template=template, image_token=model_cfg.image_token,
        num_additional_image_tokens=1)  # CLIP's class token ("default" drops it again)
    return processor


def export_hf_llava(checkpoint: str | Path, out: str | Path, dtype: Optional[str] = None,
                    overwrite: bool = False) -> Path:
    """Write the stage output ``checkpoint`` as a transformers LLaVA folder ``out`` (written
    atomically; a non-empty ``out`` only with ``overwrite``): weights in one dtype (``dtype``,
    else the checkpoint's ``model.llm.dtype``), the processor (image processor, chat template,
    ``processor_config.json``) and ``generation_config.json``; returns ``out``."""
    model, tokenizer, model_cfg, llava, target = load_for_export(checkpoint, out, dtype, overwrite, to_hf_llava,
                                                                 ("text_config", "vision_config"))
    processor = build_llava_processor(model, tokenizer, model_cfg)
    details = {"num_image_tokens": model.num_image_tokens,
               "preprocess": model_cfg.vision.preprocess or HFCLIPVisionEncoder.default_preprocess,
               "image_processor": True}
    return write_export(out, overwrite, llava, processor, checkpoint, model, model_cfg, target, details)


def import_hf_llava(folder: str | Path, out: str | Path, template: str = "vicuna_v1",
                    image_token: str = "<image>", preprocess: Optional[str] = "pad", overwrite: bool = False) -> Path:
    """Write the local transformers LLaVA folder ``folder`` as a vlm stage output ``out``
    (written atomically; a non-empty ``out`` only with ``overwrite``); returns ``out``. ``template`` and ``preprocess`` are what the model was
    trained with (LLaVA-1.5: ``vicuna_v1`` and ``pad``); ``image_token`` must be the tokenizer's
    token for ``image_token_id``."""
    folder, out = Path(folder), check_output_dir(out, overwrite)
    llava = LlavaForConditionalGeneration.from_pretrained(str(folder), torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id != llava.config.image_token_id:
        raise LlavaLayoutError(f"{folder}: the tokenizer gives '{image_token}' id {token_id}, but the model's "
                               f"image_token_id is {llava.config.image_token_id}")
    model = from_hf_llava(llava)
    final = out.resolve()
    with replacing_output_dir(out, overwrite) as tmp:
        model.vision.model.save_pretrained(str(tmp / "vision"), safe_serialization=True)
        model.llm.save_pretrained(str(tmp / "llm"), safe_serialization=True)
        save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(tmp / "connector.safetensors"))
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        tokenizer.save_pretrained(str(tmp / "llm"))
        cfg = OmegaConf.structured(ModelConfig)
        cfg.vision.name = "hf_clip"
        cfg.vision.pretrained = str(final / "vision")
        cfg.vision.feature_layer = model.vision.cfg.feature_layer
        cfg.vision.keep_cls = model.vision.cfg.keep_cls
        cfg.vision.preprocess = preprocess
        cfg.connector.name = "mlp2x_gelu"
        cfg.connector.options = {"bias": model.connector.proj[0].bias is not None}
        cfg.llm.name_or_path = str(final / "llm")
        cfg.template = template
        cfg.image_token = image_token
        (tmp / "model.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        manifest = {"vision": [], "connector": [{"weights": "connector.safetensors"}], "llm": []}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
