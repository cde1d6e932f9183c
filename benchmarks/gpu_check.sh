#!/usr/bin/env bash
# The prepared GPU check (issue 21): `benchmarks/gpu_check.sh OUTDIR` on one H100/H200, <= 7 minutes in all.
# Called by ../shared/gpu/check.sh (stage project_gpu_check, 420 s) from the project's root with the native library
# already built for the GPU; works standalone too. Stages (each bounded; a failing stage does not stop the next):
#   1. version gate: torch/triton/CUDA, one line and exit 2 if unmet (gpu_check.py --require)
#   2. the CUDA tests (pytest -m cuda): OUTDIR/cuda-tests.{log,xml}                                   <= 210 s
#   3. kernel benchmarks and the end-to-end XL runs: OUTDIR/gpu_check.{json,md}, the table printed    <= 190 s
# Summary lines go to stdout and OUTDIR/gpu_check_summary.txt.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
say() { echo "gpu_check: $*" | tee -a "$OUT/gpu_check_summary.txt"; }
if ! $PY benchmarks/gpu_check.py --require 2>"$OUT/requirements.txt"; then
  tee -a "$OUT/gpu_check_summary.txt" <"$OUT/requirements.txt"
  exit 2
fi
s=$(date +%s)
timeout 210 $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" --junitxml="$OUT/cuda-tests.xml" tests \
  >"$OUT/cuda-tests.log" 2>&1
rc=$?
say "cuda tests rc=$rc $(( $(date +%s) - s ))s: $(tail -n 1 "$OUT/cuda-tests.log" | cut -c1-200)"
s=$(date +%s)
timeout 190 $PY benchmarks/gpu_check.py "$OUT" >"$OUT/gpu_check.log" 2>&1
rc2=$?
say "benchmarks rc=$rc2 $(( $(date +%s) - s ))s (table: $OUT/gpu_check.md)"
[ -f "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
exit $(( rc != 0 || rc2 != 0 ))
