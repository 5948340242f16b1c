#!/usr/bin/env bash
# LLaVA-1.5 7B, stage 2 (visual instruction tuning) on 8 GPUs, from the align stage's output in the
# same OUT. VARIANT=lora (default; runs under DDP) or full (the whole LLM; needs a sharded strategy,
# FSDP by default here). Global batch 16 x 1 x 8 = 128, as LLaVA-1.5.
# Prepare the data first: python scripts/prepare_data.py llava-instruct ...
#   scripts/launch/llava15_7b_instruct.sh [OUT] [overrides...]
source "$(dirname "$0")/_launch.sh"
OUT="${1:-runs/llava15_7b}"
shift $(( $# > 0 ? 1 : 0 ))
VARIANT="${VARIANT:-lora}"
if [ "$VARIANT" = full ]; then
    ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/fsdp_8gpu.yaml}"
    vlm_train configs/finetune/llava15_7b_instruct.yaml "$OUT" "$@"
else
    ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}"
    vlm_train configs/finetune/llava15_7b_instruct_lora.yaml "$OUT" "$@"
fi
