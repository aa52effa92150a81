#!/usr/bin/env bash
# Set-up + lint (ruff) + type check (mypy) + the whole test suite (what CI runs). Arguments go to
# pytest, e.g. bash scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check .
python3 -m mypy
python3 -m pytest -q "$@"
