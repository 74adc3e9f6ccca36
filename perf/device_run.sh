#!/usr/bin/env bash
# One call on the GPU machine: the test suite on CUDA, then the perf sweep, everything under $1.
# Usage: bash perf/device_run.sh OUT_DIR [pytest targets...] [-- perf args...]
set -uo pipefail
out=${1:?usage: perf/device_run.sh OUT_DIR [tests...] [-- perf args...]}; shift
tests=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do tests+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then      # perf-only peers carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
if [ ${#tests[@]} -gt 0 ]; then
  python3 -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/gpu_tests.log" | tail -40
  status=${PIPESTATUS[0]}
fi
if [ $# -gt 0 ]; then
  python3 -m perf --out "$out" "$@" 2>&1 | tee "$out/perf.log" | grep -v "it/s\]" | tail -60
fi
exit $status
