#!/usr/bin/env bash
# Create .venv and install tb-microscope into it (with EXTRAS, e.g. "test"); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
