"""The registry of vision encoders, by exact name (built-ins imported on first use)."""

from vlm.core.registry import Registry

VISION_ENCODERS: Registry = Registry("vision encoder", {
    "beit3": "vlm.modeling.vision.beit3:BEiT3VisionEncoder",
    "hf_blip2_vision": "vlm.modeling.vision.hf_blip2:HFBlip2VisionEncoder",
    "hf_clip": "vlm.modeling.vision.hf_clip:HFCLIPVisionEncoder",
    "hf_siglip": "vlm.modeling.vision.hf_siglip:HFSiglipVisionEncoder",
    "hf_siglip2": "vlm.modeling.vision.hf_siglip2:HFSiglip2VisionEncoder",
    "open_clip": "vlm.modeling.vision.open_clip:OpenCLIPVisionEncoder",
    "timm_cnn": "vlm.modeling.vision.timm_cnn:TimmCNNEncoder",
    "timm_vit": "vlm.modeling.vision.timm_vit:TimmViTEncoder",
})
