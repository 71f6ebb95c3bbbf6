#!/usr/bin/env bash
# Set up .venv, train a small CNN with the Logger into runs/, and list what was logged.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/quickstart.py --logdir runs "$@"
.venv/bin/tb-microscope info runs
