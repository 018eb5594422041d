#!/usr/bin/env bash
# The main job on a fresh machine: set up, train the default model on the offline stdlib corpus, evaluate, report.
# Extra arguments go to experiments.train; the dense model is one flag away: `bash launch/main.sh --config=experiments/configs/dense_tiny.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
workdir=${WORKDIR:-runs/main}
config=(--config=experiments/configs/moe_tiny.py)
for arg in "$@"; do [[ $arg == --config=* ]] && config=(); done
.venv/bin/python -m experiments.train "${config[@]}" --workdir="$workdir" "$@"
