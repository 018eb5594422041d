#!/usr/bin/env bash
# One training run on every host of a Cloud TPU VM pod slice: the same command on all workers over
# `gcloud compute tpus tpu-vm ssh --worker=all`. Worker 0's address becomes JAX_COORDINATOR_ADDRESS, and
# jax.distributed (called by experiments.train) derives each host's process id and the process count itself
# from the TPU metadata.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a [PROJECT=my-project] [REPO_DIR=lmlab] \
#     bash launch/tpu_pod.sh [--dry_run] --config=experiments/configs/dense_1b.py --workdir=gs://bucket/runs/1b
#
# The repository must already sit in REPO_DIR on every worker with `pip install -e '.[tpu]'` done in .venv, e.g.
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#     --command='git clone URL lmlab && cd lmlab && bash launch/setup_env.sh tpu'
# Use a workdir every host can reach (a gs:// bucket or shared disk): checkpoints are written by all hosts.
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}" "${ZONE:?set ZONE to its zone, e.g. us-east5-a}"
REPO_DIR=${REPO_DIR:-lmlab}
PORT=${PORT:-8476}
gcloud_flags=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && gcloud_flags+=(--project="$PROJECT")
describe=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${gcloud_flags[@]}"
          --format='value(networkEndpoints[0].ipAddress)')
if [[ $DRY_RUN == 1 ]]; then
  coordinator='${WORKER0_IP}'
  printf 'WORKER0_IP=$(%s)\n' "$(printf '%q ' "${describe[@]}")"
else
  coordinator=$("${describe[@]}")
fi
args=$(printf '%q ' "$@")
train="cd $REPO_DIR && JAX_COORDINATOR_ADDRESS=$coordinator:$PORT .venv/bin/python -m experiments.train $args"
ssh=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_flags[@]}" --worker=all)
if [[ $DRY_RUN == 1 ]]; then  # double quotes, so that pasting both lines fills in WORKER0_IP
  printf '%q ' "${ssh[@]}"; printf -- '--command="%s"\n' "$train"
else
  exec "${ssh[@]}" --command="$train"
fi
