#!/usr/bin/env bash
# On the GPU machine: compute-sanitizer (memcheck, racecheck) over every kernel's edge shapes, then
# the soak. Reports land in $1. Usage: bash tests/gpu/run_reliability.sh OUT_DIR [soak iterations]
set -uo pipefail
out=${1:?usage: tests/gpu/run_reliability.sh OUT_DIR [soak iterations]}
iterations=${2:-10000}                       # 0 skips the soak
tools=${SANITIZER_TOOLS:-memcheck racecheck}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
status=0
for tool in $tools; do
  "$sanitizer" --tool "$tool" --target-processes all --error-exitcode 3 \
    python3 tests/gpu/sanitize_cases.py > "$out/sanitizer_$tool.txt" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "$tool: exit $rc; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|op calls' "$out/sanitizer_$tool.txt" | tr '\n' ' ')"
  # which kernels the findings are in, and what kind (the full report stays in the .txt)
  grep -E "^=========  *(Error|Warning|Race|Invalid|.*hazard)|in [a-z_0-9]+kernel" "$out/sanitizer_$tool.txt" \
    | sed -E 's/0x[0-9a-f]+/ADDR/g; s/[0-9]+ bytes/N bytes/g' | sort | uniq -c | sort -rn | head -20
done
if [ "$iterations" -gt 0 ]; then
  python3 tests/gpu/soak.py "$iterations" > "$out/soak.txt" 2>&1; rc=$?; [ $rc -ne 0 ] && status=$rc
  tail -3 "$out/soak.txt"
fi
exit $status
