#!/usr/bin/env bash
# GPU acceptance: the first command to run on a GPU machine (issue 22, item 5).
#
#   bash benchmarks/gpu_acceptance.sh                # one GPU, under 8 minutes
#   bash benchmarks/gpu_acceptance.sh --cpu-smoke    # tiny shapes on the CPU (CI runs it)
#
# Checks (a) flex vs SDPA forward+backward, (b) 410M bf16 tokens/s, MFU, adaptive cost and peak
# memory against the planner, (c) FSDP2's reduce path, (d) preprocess -> pretrain -> save ->
# resume; each passes or fails against a stated bound (see benchmarks/gpu_acceptance.py).
# Writes benchmarks/results/gpu_acceptance.json (--cpu-smoke: gpu_acceptance_cpu_smoke.json),
# after every check, so a failure or the time limit still leaves a JSON. Other arguments go to
# the Python module (--out PATH, --only a_flex_vs_sdpa,d_resume, --precision fp32, ...).
# Exit code 0 when every check passed.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
for arg in "$@"; do
    [[ "$arg" == "--cpu-smoke" ]] && smoke=1
done
if [[ $smoke == 0 ]]; then
    if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_acceptance: no CUDA device visible to torch (use --cpu-smoke on a CPU machine)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    # cuBLAS needs this workspace setting for repeatable GEMMs (check d compares two runs)
    export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
fi
# Hard stop at 9 minutes: the module itself stops starting checks after --budget-s (450 s).
exec timeout --signal=INT 540 python -m benchmarks.gpu_acceptance "$@"
