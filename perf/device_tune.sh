#!/usr/bin/env bash
# One call on the GPU machine: tune (python -m fused_ops tune ...) into $1, then keep the log.
# Usage: bash perf/device_tune.sh OUT_DIR [tune args...]
set -uo pipefail
out=${1:?usage: perf/device_tune.sh OUT_DIR [tune args...]}; shift
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
python3 -m fused_ops tune --out "$out" "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tail -30
