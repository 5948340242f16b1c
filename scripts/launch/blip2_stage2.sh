#!/usr/bin/env bash
# BLIP-2 stage 2 (generative learning: the Q-Former's visual tokens into frozen OPT-2.7B) on 8 GPUs,
# from stage 1's output in the same OUT (configs/pretrain/blip2_opt2.7b.yaml, stage `stage2`:
# global batch 24 x 10 x 8 = 1920).
#   scripts/launch/blip2_stage2.sh [OUT] [overrides...]
source "$(dirname "$0")/_launch.sh"
OUT="${1:-runs/blip2_opt2.7b}"
shift $(( $# > 0 ? 1 : 0 ))
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-configs/accelerate/ddp_8gpu.yaml}"
vlm_train configs/pretrain/blip2_opt2.7b.yaml "$OUT" --stage stage2 "$@"
