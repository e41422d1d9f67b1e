#!/usr/bin/env bash
# The engine's GPU checks, as one prepared script for a machine with a CUDA device: the
# exactness tests that run on CUDA (the gpu-marked ones, plus the whole engine suite with CUDA
# visible), then both engine benches on CUDA. Everything also passes on the CPU without it.
#   bash bench/cuda_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/cuda-check}}
mkdir -p "$out"
py=.venv/bin/python
$py -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device here")'
$py -c 'import torch; print(torch.cuda.get_device_name(0))' | tee "$out/device.txt"
$py -m pytest -q -m gpu tests/test_gpu_prefix_reuse.py tests/test_gpu_prefix_scheduler.py 2>&1 | tee "$out/gpu-tests.txt"
$py bench/prefix.py --device cuda --json 2>"$out/prefix.err" | tail -1 | tee "$out/prefix.json"
$py bench/batching.py --device cuda --json 2>"$out/batching.err" | tail -1 | tee "$out/batching.json"
