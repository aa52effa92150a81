#!/usr/bin/env bash
# Set-up + the demo: poison a teacher on real MNIST, distill it data-free with and without ABD,
# print the ACC/ASR table and write a plot (out/demo.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m abd_plugin demo --out out "$@"
