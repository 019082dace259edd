#!/usr/bin/env bash
# Small-scale reproduction study (issue #11), one command, resumable:
#   every method (vanilla x2 seeds, adaptive x2 seeds + one more tau + one more lambda, looped
#   K=2 and K=4, pause, pondering, PonderLM-2 (K=2, J=3), MoR (expert-choice, N_r=2), a vanilla
#   deepened to adaptive's training FLOPs, a vanilla with the latent methods' embedding scale)
#   trained on the default corpus with the same
#   tokens, then evaluated (validation + Moby Dick held-out perplexity, steps, FLOPs, per-token
#   readouts) and analysed (steps vs difficulty, the paper's Figure 2 shape).
#
# Usage: bash examples/reproduce_small.sh [--budget 1.0] [--threads 1] [--dry-run]
#                                         [--analyze-only] [--only RUN ...] [--force]
#   --budget F   scales every run's iterations (1.0 = 140 iterations x 16 x 128 tokens, about
#                80 CPU-minutes in all, 100-120 wall-minutes on 2 shared cores; 0.05 = a smoke test)
#   --threads N  torch threads per process (default 1; 2 threads on a 2-core machine that
#                other jobs share ran several times slower, see docs/results.md)
# A run whose final eval JSON (benchmarks/results/reproduce_small/runs/<run>.json) exists is
# skipped; an interrupted run resumes from its last checkpoint (runs/reproduce_small/<run>).
# Outputs: benchmarks/results/reproduce_small/{study.json,study.md,runs/,tokens/,compare/},
# docs/results_*.png. Everything else: python tools/reproduce_study.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[$i]}" = "--threads" ] && THREADS=${args[$((i + 1))]:-1}
done
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
exec python tools/reproduce_study.py "$@"
