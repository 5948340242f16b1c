#!/usr/bin/env bash
# One-GPU check of every strategy one GPU can run, on a ~1.1B-parameter model built from an inline
# config (scripts/gpu_check.py; no download), bf16: tokens/s and peak memory per strategy, with and
# without gradient checkpointing. NOT YET RUN ON A GPU (no GPU was available when it was written).
#   bash scripts/gpu_check.sh [OUT]            # default OUT=runs/gpu_check; SIZE=tiny for a CPU dry run
# zero2 / zero3 run only where deepspeed is installed (pip install -e ".[deepspeed]").
set -u
OUT=${1:-runs/gpu_check}
SIZE=${SIZE:-1b}
STEPS=${STEPS:-20}
strategies="ddp fsdp"
if python -c "import deepspeed" 2>/dev/null && python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  strategies="$strategies zero2 zero3"
else
  echo "zero2 / zero3 skipped: needs CUDA and deepspeed" >&2
fi
mkdir -p "$OUT"
for strategy in $strategies; do
  for gc in "" "--gradient-checkpointing"; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} torchrun --standalone --nproc_per_node 1 scripts/gpu_check.py \
      --strategy "$strategy" $gc --size "$SIZE" --steps "$STEPS" --out "$OUT" 2>>"$OUT/stderr.log" \
      | grep '^{' | tee -a "$OUT/results.jsonl" || echo "{\"strategy\": \"$strategy\", \"failed\": true, \"see\": \"$OUT/stderr.log\"}"
  done
done
