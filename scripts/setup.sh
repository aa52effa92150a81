#!/usr/bin/env bash
# Installs abd-plugin with every extra, pinned to this environment's torch (constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test,vision,bench]"
