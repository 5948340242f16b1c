# Shared by the launch scripts: run `vlm train` on every GPU of this machine.
#   LAUNCHER=accelerate (default) | torchrun     NUM_GPUS=8 (default)
#   ACCELERATE_CONFIG=configs/accelerate/ddp_8gpu.yaml (accelerate only)
# Arguments after the script's own are passed to `vlm train` (dotted overrides, --stage, --resume).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
NUM_GPUS="${NUM_GPUS:-8}"
LAUNCHER="${LAUNCHER:-accelerate}"

vlm_train() {  # vlm_train CONFIG OUT [vlm train arguments...]
    local config="$1" out="$2"
    shift 2
    if [ "$LAUNCHER" = torchrun ]; then
        set -x
        torchrun --standalone --nproc_per_node "$NUM_GPUS" -m vlm train "$config" --out "$out" "$@"
    else
        set -x
        accelerate launch --config_file "${ACCELERATE_CONFIG}" --num_processes "$NUM_GPUS" \
            -m vlm train "$config" --out "$out" "$@"
    fi
}
