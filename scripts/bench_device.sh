#!/usr/bin/env bash
# One prepared run for a machine with an accelerator (JAX with CUDA or TPU support already installed, no network):
# random weights of real shapes, bfloat16 decode speed of AR, SD, EFT and SSS, at most 8 minutes.
#   scripts/bench_device.sh                 # writes results/bench_device.json (or $OUT/bench_device.json)
#   scripts/bench_device.sh --smoke         # tiny shapes on CPU, seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
out_dir=${OUT:-results}
mkdir -p "$out_dir"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec timeout 480 "$PY" scripts/bench_device.py --out "$out_dir/bench_device.json" "$@"
