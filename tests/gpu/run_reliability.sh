#!/usr/bin/env bash
# On the GPU machine: compute-sanitizer (memcheck, racecheck) over every kernel's edge shapes, then
# the soak. Reports land in $1. Usage: bash tests/gpu/run_reliability.sh OUT_DIR [soak iterations]
set -uo pipefail
out=${1:?usage: tests/gpu/run_reliability.sh OUT_DIR [soak iterations]}
iterations=${2:-10000}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
status=0
for tool in memcheck racecheck; do
  "$sanitizer" --tool "$tool" --target-processes all --error-exitcode 3 \
    python3 tests/gpu/sanitize_cases.py > "$out/sanitizer_$tool.txt" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|op calls' "$out/sanitizer_$tool.txt" | tr '\n' ' ')"
done
python3 tests/gpu/soak.py "$iterations" > "$out/soak.txt" 2>&1; rc=$?; [ $rc -ne 0 ] && status=$rc
tail -3 "$out/soak.txt"
exit $status
