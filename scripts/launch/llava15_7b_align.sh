#!/usr/bin/env bash
# LLaVA-1.5 7B, stage 1 (feature alignment) on 8 GPUs: the projector on LCS-558K, CLIP ViT-L/14-336
# and Vicuna-7B-v1.5 frozen (configs/pretrain/llava15_7b_align.yaml: global batch 16 x 2 x 8 = 256).
# Prepare the data first: python scripts/prepare_data.py llava-pretrain ...
#   scripts/launch/llava15_7b_align.sh [OUT] [overrides...]
#   e.g. scripts/launch/llava15_7b_align.sh runs/llava15_7b model.llm.name_or_path=/models/vicuna-7b-v1.5
source "$(dirname "$0")/_launch.sh"
OUT="${1:-runs/llava15_7b}"
shift $(( $# > 0 ? 1 : 0 ))
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}"
vlm_train configs/pretrain/llava15_7b_align.yaml "$OUT" "$@"
