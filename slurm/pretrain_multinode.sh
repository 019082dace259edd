#!/usr/bin/env bash
# Multi-node template for the paper-scale 410M / 1.4B experiments (one config per method).
#
#   SIZE=410m METHOD=adaptive sbatch slurm/pretrain_multinode.sh
#   SIZE=1.4b METHOD=pondering sbatch --nodes=4 slurm/pretrain_multinode.sh train.lr=1e-4
#   SIZE=1.4b bash slurm/pretrain_multinode.sh --dry-run       # command + planner report
#
# The launch itself (rendezvous, NCCL settings, preemption, requeue, resume from `latest`, every
# environment variable) is slurm/pretrain_7b.sh's; this file only sets the defaults of these
# smaller runs: the config's own TP (1), micro-batch and recompute, 2 nodes.
#
#SBATCH --job-name=mlc-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mlc-%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
export REPO_DIR
export SIZE=${SIZE:-410m}                    # 410m or 1.4b
export METHOD=${METHOD:-adaptive}
export NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-2}}
export SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
# exec keeps this process (and so Slurm's --signal=B:USR1 target) for the launcher's trap
exec bash "$REPO_DIR/slurm/pretrain_7b.sh" "$@"
