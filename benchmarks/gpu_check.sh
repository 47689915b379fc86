#!/usr/bin/env bash
# Everything a GPU machine is for, in one call (well inside 10 minutes):
#   build for this GPU's arch with all cores, run the CUDA tests (and the CPU ones, cheaply),
#   run compute-sanitizer on a few small CUDA tests, run the quick benchmarks of every family,
#   and write logs + results to OUTDIR.
#
#   usage: benchmarks/gpu_check.sh OUTDIR
#
# The machine has no network: the build uses what is installed (torch, pybind11, cmake, ninja,
# setuptools) with --no-build-isolation. OUTDIR receives at most 8 files (the device tool's limit):
#   summary.txt  build.log  pytest.log  sanitizer.log  bench.log  results.tar.gz
# results.tar.gz unpacks to <device-slug>/<family>.{json,md}, to be committed under benchmarks/results/.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

summary "== gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/summary.txt" 2>&1
arch=$($PY -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))") \
  || { summary "no CUDA device visible to torch"; exit 1; }
summary "arch: $arch  cores: $(nproc)"

t0=$(date +%s)
if PYLLMOPS_CUDA=1 PYLLMOPS_CUDA_ARCHS="$arch" MAX_JOBS=$(nproc) \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  summary "build: ok in $(( $(date +%s) - t0 )) s"
else
  summary "build: FAILED after $(( $(date +%s) - t0 )) s (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
$PY -m pyllmops info >> "$OUT/summary.txt" 2>&1

t0=$(date +%s)
timeout 300 $PY -m pytest -q -p no:cacheprovider -rs tests > "$OUT/pytest.log" 2>&1
summary "pytest (cpu + cuda): rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest.log")"

if command -v compute-sanitizer > /dev/null; then
  t0=$(date +%s)
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider -m cuda \
    -k "bit_exact and float16 and (17 or 4097 or 7x5)" tests > "$OUT/sanitizer.log" 2>&1
  summary "compute-sanitizer memcheck: rc=$? in $(( $(date +%s) - t0 )) s: $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -1)"
fi

t0=$(date +%s)
rm -rf "$OUT/results" && mkdir -p "$OUT/results"
timeout 240 $PY -m pyllmops bench all --quick --out "$OUT/results" > "$OUT/bench.log" 2>&1
summary "bench: rc=$? in $(( $(date +%s) - t0 )) s"
tar -C "$OUT/results" -czf "$OUT/results.tar.gz" . && rm -rf "$OUT/results"
summary "== done $(date -u +%FT%TZ)"
