#!/usr/bin/env bash
# The full offline demos, run by hand (CI runs only short smoke runs of them): the README's demo (FedAvg), the
# demo with TAP's two stages, and every other algorithm on the same federation. Each run's directory is
# RUN_ROOT/<algorithm> (default runs/demos); the time of each run is printed. On 2 CPU cores the whole script
# takes about 1.5 hours.
#
#   bash experiments/demos.sh [RUN_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-runs/demos}
for algorithm in FedAvg TAP FedProx PerFedAvg Local Ditto FedRep; do
    start=$SECONDS
    tapl fit --config experiments/demo.yaml --algorithm "$algorithm" --run_dir "$root/$algorithm" \
        --federation.progress false
    test -s "$root/$algorithm/results.json"
    echo "demo: $algorithm in $((SECONDS - start)) s; results in $root/$algorithm/results.md"
done
