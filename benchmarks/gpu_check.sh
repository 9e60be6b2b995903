#!/usr/bin/env bash
# On a machine with a GPU: start the service on CUDA, check its answers equal the CPU ones, print atoms/s.
#   bash benchmarks/gpu_check.sh [--store model_store] [--sizes 192 12288 98304]
# Exit status 0: on CUDA and equal within tolerance; 1: mismatch or not on CUDA; 2: no CUDA provider.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
