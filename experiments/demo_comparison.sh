#!/usr/bin/env bash
# The demo comparison, run by hand: every built-in algorithm on the demo federation over seeds 0,1,2, two runs
# at a time, into RUN_DIR (default runs/demo_comparison). Its comparison.md is kept in
# experiments/demo_comparison.md. A finished run is reused, so re-running completes an interrupted comparison.
#
# Settings beyond the demo's (see experiments/sweeps.md and experiments/tap_stage2.md):
# - FedProx mu 0.1: the largest value that did not slow training under the demo's AdamW;
# - TAP stage 2 with its own budget (50 batches at lr 1e-3) and the reference code's distillation losses;
# - Per-FedAvg with its defaults (Adam outer step, alpha 0.01, beta 1e-3), Ditto and FedRep with theirs.
#
#   bash experiments/demo_comparison.sh [RUN_DIR] [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${1:-runs/demo_comparison}
seeds=${2:-0,1,2}
tapl compare --config experiments/demo.yaml --algorithms FedAvg,FedProx,PerFedAvg,Local,Ditto,FedRep,TAP \
    --seeds "$seeds" --run_dir "$run_dir" --jobs 2 --baseline FedAvg:global+FT \
    --algorithm.mu 0.1 \
    --algorithm.distill_steps 50 --algorithm.distill_lr 1e-3 \
    --algorithm.distill_losses '{image_generation: width_kl, text_generation: sequence_sum}'
