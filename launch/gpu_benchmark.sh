#!/usr/bin/env bash
# One-call GPU benchmark: lmlab presets beside the HF/torch peer on the same card, MoE expert scaling.
# Run on the device machine from the repo root with .bench/ (peer_torch.py, jax_peak.py) and .whl/ carried.
# MOE_ONLY=1 re-checks only the MoE presets and expert scaling.
# SMOKE=1 runs the same plumbing on tiny configs (CPU) to check the script before spending GPU time.
set -uo pipefail
OUT=${OUT:-/tmp/lmlab_bench}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:. || exit 1
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
results="$OUT/results.jsonl"
lmlab() {  # config, extra flags...; a failed run is retried once with XLA attention and says so
  local cfg=$1; shift
  timeout "${RUN_TIMEOUT:-150}" $PY -m experiments.benchmark --config="experiments/configs/$cfg.py" \
    --steps="${STEPS:-10}" "$@" 2>>"$OUT/stderr.log" | tee -a "$results"
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "{\"failed\": \"$cfg $*\", \"retry\": \"attention=xla\"}" | tee -a "$results"
    tail -3 "$OUT/stderr.log"
    timeout "${RUN_TIMEOUT:-150}" $PY -m experiments.benchmark --config="experiments/configs/$cfg.py" \
      --steps="${STEPS:-10}" "$@" --config.model.attention=xla 2>>"$OUT/stderr.log" | tee -a "$results"
  fi
}
peer() { timeout "${RUN_TIMEOUT:-150}" $PY .bench/peer_torch.py --steps="${STEPS:-10}" --preset "$@" 2>>"$OUT/stderr.log" | tee -a "$results"; }

if [ "${SMOKE:-0}" = 1 ]; then
  lmlab dense_tiny --config.batch_size=8
  lmlab moe_tiny --config.batch_size=8 --config.model.moe.num_experts=16
  peer tiny tiny-moe
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${MOE_ONLY:-0}" = 1 ]; then  # the short MoE re-check: dropless paths, expert scaling, the peer beside them
  lmlab moe_8x2
  lmlab moe_32x4
  peer moe-8x2 moe-32x4
  lmlab moe_8x2 --config.model.moe.dispatch=capacity --config.model.moe.capacity_impl=gather
  for experts in 8 32 64; do
    lmlab moe_8x2 --config.model.num_layers=4 --config.model.moe.num_experts=$experts
  done
  echo "benchmark finished"
  exit 0
fi
$PY .bench/jax_peak.py | tee -a "$results"
lmlab dense_1b
lmlab dense_135m
peer dense-1b dense-135m
lmlab moe_8x2
lmlab moe_32x4
peer moe-8x2 moe-32x4
lmlab moe_8x2 --config.model.moe.dispatch=capacity
lmlab moe_8x2 --config.model.moe.dispatch=capacity --config.model.moe.capacity_impl=gather
for experts in 8 16 32 64; do  # fixed top-2 and expert width: active parameters stay the same
  lmlab moe_8x2 --config.model.num_layers=4 --config.model.moe.num_experts=$experts
done
lmlab dense_1b --config.model.attention=xla
echo "benchmark finished"
