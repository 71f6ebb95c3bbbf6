#!/usr/bin/env bash
# Set up .venv (test extras) and Debian's Chromium, check style and the docs, run all the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/browser.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mkdocs build --strict --site-dir build/site
.venv/bin/python -m pytest -q --durations=25 "$@"
