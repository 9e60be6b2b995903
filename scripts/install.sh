#!/usr/bin/env bash
# Installs dpserve with its training and test extras. torch is pinned to the CPU build 2.13.0 first so that no
# resolver ever pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[train,test]"
