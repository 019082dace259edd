#!/usr/bin/env bash
# Pretrain on one machine with torchrun (no Slurm): all its GPUs, or CPU processes on gloo.
#
#   bash examples/torchrun_single_node.sh                                 # 410M adaptive, all GPUs
#   CONFIG=examples/configs/1.4b_vanilla.yaml NPROC=4 bash examples/torchrun_single_node.sh
#   bash examples/torchrun_single_node.sh train.micro_batch_size=2 train.lr=2e-4   # overrides
#   CONFIG=examples/configs/tiny.yaml NPROC=2 bash examples/torchrun_single_node.sh \
#       parallel.backend=gloo                 # CPU smoke run (after examples/quickstart.sh)
#
# Environment: CONFIG, NPROC (default: the GPU count, else 1), MASTER_PORT, GPU, GPU_MEMORY_GB,
# PLAN_CHECK (1: print the planner's report and stop if it says the layout cannot fit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONFIG=${CONFIG:-examples/configs/410m_adaptive.yaml}
if [[ -z "${NPROC:-}" ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    NPROC=${NPROC:-0}
    (( NPROC > 0 )) || NPROC=1
fi
MASTER_PORT=${MASTER_PORT:-29500}
GPU=${GPU:-H100}
GPU_MEMORY_GB=${GPU_MEMORY_GB:-80}
PLAN_CHECK=${PLAN_CHECK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}

if [[ "$PLAN_CHECK" == 1 ]]; then
    python -m megatron_latentcot.plan --config "$CONFIG" --world-size "$NPROC" --gpu "$GPU" \
        --gpu-memory-gb "$GPU_MEMORY_GB" --check "$@"
fi
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" --master-port "$MASTER_PORT" \
    -m megatron_latentcot.pretrain --config "$CONFIG" "$@"
