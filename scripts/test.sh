#!/usr/bin/env bash
# The README's test command: install everything, lint, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m ruff check app training tests benchmarks
python -m pytest -q "$@"
