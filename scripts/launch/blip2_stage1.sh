#!/usr/bin/env bash
# BLIP-2 stage 1 (representation learning: ITC + ITM + ITG on the Q-Former, no LLM) on 8 GPUs
# (configs/pretrain/blip2_opt2.7b.yaml, stage `stage1`: global batch 70 x 3 x 8 = 1680).
# Prepare the data first: python scripts/prepare_data.py coco-karpathy ... (and your other pairs).
#   scripts/launch/blip2_stage1.sh [OUT] [overrides...]
source "$(dirname "$0")/_launch.sh"
OUT="${1:-runs/blip2_opt2.7b}"
shift $(( $# > 0 ? 1 : 0 ))
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}"
vlm_train configs/pretrain/blip2_opt2.7b.yaml "$OUT" --stage stage1 "$@"
