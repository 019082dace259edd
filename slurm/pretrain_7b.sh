#!/usr/bin/env bash
# Pretrain the 7B Llama with token-level adaptive latent CoT on several nodes of 8 GPUs.
#
#   sbatch slurm/pretrain_7b.sh [section.field=value ...]      # submit (4 nodes x 8 GPUs)
#   sbatch --nodes=8 slurm/pretrain_7b.sh                       # more nodes: DP grows
#   METHOD=vanilla TP=8 MICRO_BATCH=1 sbatch slurm/pretrain_7b.sh
#   bash slurm/pretrain_7b.sh --dry-run [overrides]             # print the command + plan only
#
# Arguments after the options are config overrides (section.field=value), passed to both the
# planner and the trainer. Every path and size below is an environment variable; an empty value
# (e.g. TP=) keeps the config's own value.
#
# One torchrun per node (srun, one task per node) starts GPUS_PER_NODE workers; rendezvous is
# c10d on the first node of the allocation. Preemption: Slurm sends SIGUSR1 to this batch shell
# 300 s before the time limit (--signal=B:USR1@300); the trap forwards it to srun -> torchrun ->
# workers, which save a checkpoint at the next iteration boundary and exit (code 3); the job is
# then requeued (--requeue) and resumes from `latest` in $SAVE (train.load=$SAVE, always set).
# --cpus-per-task: the cores of a node for its 8 workers (adjust to the cluster's nodes).
#
#SBATCH --job-name=mlc-7b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mlc-%x-%j.out

set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi

# -- where things are (sbatch runs a copy of this script: find the repository explicitly) -------
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO_DIR"
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}

# -- model, method, data ----------------------------------------------------------------------
METHOD=${METHOD:-adaptive}                    # vanilla adaptive latent_fixed looped pause pondering ponderlm2
SIZE=${SIZE:-7b}
CONFIG=${CONFIG:-examples/configs/${SIZE}_${METHOD}.yaml}
RUN_NAME=${RUN_NAME:-${SIZE}_${METHOD}}
# One prefix, or a blend "0.7 /data/pile_a 0.3 /data/pile_b" (weight prefix pairs).
DATA_PATH=${DATA_PATH:-data/pile_text_document}
VALID_PATH=${VALID_PATH-}                     # optional separate validation prefix
HELDOUT_PATH=${HELDOUT_PATH-}                 # optional out-of-domain held-out prefix
TOKENIZER_TYPE=${TOKENIZER_TYPE:-huggingface}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-tokenizers/gpt-neox-20b/tokenizer.json}
DATA_CACHE=${DATA_CACHE-}                     # sample-index cache dir (default: beside the data)

# -- layout and batch (empty = the config's value) ---------------------------------------------
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-4}}}   # outside Slurm (dry run): 4
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
TP=${TP-}                                     # tensor parallel (7B config: 4)
# Which method runs under which layout: LAYOUT_REFUSALS in megatron_latentcot/config.py, one table
# read by the trainer and by the planner check below (PLAN_CHECK=1). With K_max > 1, PP > 1 and
# SP exclude each other, and adaptive or latent_fixed with latent.compact=false run with neither.
PP=${PP-}                                     # pipeline parallel; with K_max > 1 not for: pause pondering ponderlm2 mor
SP=${SP-}                                     # sequence parallel (needs TP > 1); with K_max > 1 not for: pause pondering ponderlm2 mor
ZERO=${ZERO-fsdp2}                            # ZeRO over data parallel: fsdp2 or none
RECOMPUTE=${RECOMPUTE-}                       # activation recompute per block: true/false
MICRO_BATCH=${MICRO_BATCH-}
GLOBAL_BATCH=${GLOBAL_BATCH-}
SEQ_LENGTH=${SEQ_LENGTH-}
TRAIN_ITERS=${TRAIN_ITERS-}
LR=${LR-}
ATTENTION_BACKEND=${ATTENTION_BACKEND-}       # flex (GPU) or sdpa
BACKEND=${BACKEND-}                           # process-group backend: auto, nccl, gloo

# -- outputs ------------------------------------------------------------------------------------
RUN_ROOT=${RUN_ROOT:-runs}
SAVE=${SAVE:-${RUN_ROOT}/${RUN_NAME}/checkpoints}   # also loaded from: resume from `latest`
LOG_DIR=${LOG_DIR:-${RUN_ROOT}/${RUN_NAME}/logs}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${LOG_DIR}/tensorboard}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
WANDB_PROJECT=${WANDB_PROJECT-}               # set to log to wandb
WANDB_MODE=${WANDB_MODE:-offline}             # offline, online or disabled

# -- planner ------------------------------------------------------------------------------------
GPU=${GPU:-H100}
GPU_MEMORY_GB=${GPU_MEMORY_GB:-80}
MFU=${MFU:-0.4}
PLAN_CHECK=${PLAN_CHECK:-1}                   # 1: refuse to launch a layout the planner rejects

# -- rendezvous ---------------------------------------------------------------------------------
first_host() {
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
    else
        hostname
    fi
}
MASTER_ADDR=${MASTER_ADDR:-$(first_host)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-mlc-$$}}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-280}     # seconds torchrun lets workers save after a signal

# -- NCCL and threads (documented defaults; the cluster's own settings win) --------------------
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1: a failed collective aborts the job instead of hanging.
# CUDA_DEVICE_MAX_CONNECTIONS=1: megatron-core's TP/SP communication relies on kernel order.
# NCCL_DEBUG=WARN: set INFO to see the topology and transports chosen (IB, NVLink, sockets).
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA: set when the cluster needs a specific interface or HCA.
# NCCL_IB_TIMEOUT=22: longer InfiniBand timeouts for large allreduces on busy fabrics.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
export WANDB_MODE

# -- the overrides shared by the planner and the trainer ----------------------------------------
OVERRIDES=()
add() {  # add KEY VALUE: one section.field=value override, skipped when VALUE is empty
    if [[ -n "$2" ]]; then
        OVERRIDES+=("$1=$2")
    fi
}
yaml_list() {  # "a b c" -> "[a, b, c]"
    local IFS=' '
    local -a items
    read -r -a items <<<"$1"
    local joined
    joined=$(printf '%s, ' "${items[@]}")
    printf '[%s]' "${joined%, }"
}
add parallel.tensor_model_parallel_size "$TP"
add parallel.pipeline_model_parallel_size "$PP"
add parallel.sequence_parallel "$SP"
add parallel.zero "$ZERO"
add parallel.backend "$BACKEND"
add latent.attention_backend "$ATTENTION_BACKEND"
add train.recompute "$RECOMPUTE"
add train.micro_batch_size "$MICRO_BATCH"
add train.global_batch_size "$GLOBAL_BATCH"
add train.train_iters "$TRAIN_ITERS"
add train.lr "$LR"
add data.seq_length "$SEQ_LENGTH"
add data.data_path "$(yaml_list "$DATA_PATH")"
add data.valid_path "$VALID_PATH"
add data.heldout_path "$HELDOUT_PATH"
add data.tokenizer_type "$TOKENIZER_TYPE"
add data.tokenizer_model "$TOKENIZER_MODEL"
add data.cache_dir "$DATA_CACHE"
add train.save "$SAVE"
add train.load "$SAVE"
add train.save_interval "$SAVE_INTERVAL"
add train.tensorboard_dir "$TENSORBOARD_DIR"
add train.wandb_project "$WANDB_PROJECT"
add train.wandb_mode "$WANDB_MODE"
OVERRIDES+=("$@")

PLAN_CMD=("$PYTHON" -m megatron_latentcot.plan --config "$CONFIG" --nodes "$NNODES"
          --gpus-per-node "$GPUS_PER_NODE" --gpu "$GPU" --gpu-memory-gb "$GPU_MEMORY_GB"
          --mfu "$MFU" "${OVERRIDES[@]}")

TORCHRUN_ARGS=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
               --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
               --max-restarts 0 --log-dir "$LOG_DIR/torchrun/$RDZV_ID")
torch_launcher_has() {  # torch_launcher_has OPTION: grep torchrun's source (importing torch is slow)
    local run_py
    run_py=$("$PYTHON" -c 'import importlib.util as u, os
print(os.path.join(os.path.dirname(u.find_spec("torch").origin), "distributed", "run.py"))' \
        2>/dev/null) || return 1
    grep -q -- "$1" "$run_py" 2>/dev/null
}
if torch_launcher_has --signals-to-handle; then  # recent torch: forward SIGUSR1, wait to save
    TORCHRUN_ARGS+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
                    --shutdown-timeout "$SHUTDOWN_TIMEOUT")
fi
SRUN_ARGS=(--nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then  # srun no longer inherits it from sbatch (>= 22.05)
    SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
TRAIN_CMD=(srun "${SRUN_ARGS[@]}" "$TORCHRUN" "${TORCHRUN_ARGS[@]}"
           -m megatron_latentcot.pretrain --config "$CONFIG" "${OVERRIDES[@]}")

print_cmd() {  # one option (and its value) per line, shell-quoted: copy-pastable
    printf '%q' "$1"
    shift
    while (( $# )); do
        if [[ "$1" == -* && "$1" != *=* && $# -gt 1 && "$2" != -* ]]; then
            printf ' \\\n    %q %q' "$1" "$2"
            shift 2
        else
            printf ' \\\n    %q' "$1"
            shift
        fi
    done
    printf '\n'
}

if (( DRY_RUN )); then
    echo "== command ($NNODES node(s) x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT)"
    print_cmd "${TRAIN_CMD[@]}"
    echo "== plan"
    "${PLAN_CMD[@]}" || echo "(planner exit code $?)"
    exit 0
fi

mkdir -p "$SAVE" "$LOG_DIR"
echo "== $(date -Is) job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: $RUN_NAME on" \
     "$NNODES x $GPUS_PER_NODE GPUs; checkpoints $SAVE (resumes from latest)"
if [[ "$PLAN_CHECK" == 1 ]]; then
    plan_rc=0
    "${PLAN_CMD[@]}" --check | tee "$LOG_DIR/plan.txt" || plan_rc=$?
    if (( plan_rc != 0 )); then
        echo "the planner rejects this layout (exit $plan_rc); PLAN_CHECK=0 launches anyway" >&2
        exit "$plan_rc"
    fi
fi

PREEMPTED=0
SRUN_PID=
# shellcheck disable=SC2317  # invoked by the trap below
on_preempt() {
    PREEMPTED=1
    echo "== $(date -Is) preemption signal: asking the workers to save and stop"
    if [[ -n "$SRUN_PID" ]]; then
        kill -USR1 "$SRUN_PID" 2>/dev/null || true  # srun forwards it to torchrun -> workers
    fi
}
trap on_preempt USR1 TERM

"${TRAIN_CMD[@]}" &
SRUN_PID=$!
rc=0
while :; do  # `wait` returns early when a trapped signal arrives: wait again for srun
    wait "$SRUN_PID" && rc=0 || rc=$?
    if kill -0 "$SRUN_PID" 2>/dev/null; then
        continue
    fi
    break
done

# 3 = the trainer saved and stopped on a preemption signal (megatron_latentcot.training.faults).
# torchrun reports its own code, not the workers', so a signal we forwarded counts too -- unless
# training finished (0) before the signal reached it.
if (( rc == 3 )) || { (( PREEMPTED )) && (( rc != 0 )); }; then
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        echo "== $(date -Is) requeueing job $SLURM_JOB_ID (exit $rc): it resumes from $SAVE/latest"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit 0
fi
echo "== $(date -Is) training exited with code $rc"
exit "$rc"
