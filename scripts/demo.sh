#!/usr/bin/env bash
# Set up .venv, then train a small CNN on generated images, render it and serve TensorBoard with
# the Microscope tab (tb-microscope demo; its options pass through, e.g. --port 6007 --no-serve).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tb-microscope demo "$@"
