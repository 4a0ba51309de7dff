#!/usr/bin/env bash
# Run on a machine with a CUDA GPU:   bash scripts/gpu_check.sh /tmp/gpu_out
#
# The one command for a GPU machine (numba-cuda, CuPy and PyTorch installed, no
# network needed): it records what the machine is, runs the CUDA tests on the
# device (not the simulator), compiles the kernel report, and times the GPU
# section of the benchmark.  Everything goes under OUTDIR:
#   summary.txt        one line per step: ok / FAILED / TIMED OUT / skipped, and its seconds
#   nvidia-smi.txt     nvidia-smi (when present)
#   info.txt           python -m fastattn info (and which fastattn was imported)
#   pytest_cuda.log    python -m pytest -m cuda -q -x, NUMBA_ENABLE_CUDASIM unset
#   pytest_cuda.xml    the same as JUnit XML
#   cuda_report.log, cuda_report.json   python -m fastattn cuda-report (when the checkout has it)
#   bench_cuda.log, bench_cuda.json     python -m fastattn bench --backend cuda
# Each step has its own time limit, cut to what is left of 7.5 minutes; a
# failing step is recorded and the next one runs; the exit status is non-zero
# if any step failed.  The checkout's fastattn is imported through PYTHONPATH
# (nothing is installed).  Set PYTHON to choose the interpreter.
set -uo pipefail

if [ "$#" -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
cd "$repo" || exit 2

python="${PYTHON:-}"
if [ -z "$python" ]; then
    python="$(command -v python || command -v python3 || echo python3)"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONIOENCODING=utf-8
unset NUMBA_ENABLE_CUDASIM   # the real device, never the simulator

summary="$out/summary.txt"
: > "$summary"
failed=0
deadline=$((SECONDS + 450))   # every step's limit is cut to what is left of 7.5 minutes

# step NAME SECONDS LOG COMMAND...: run COMMAND with a time limit (SIGINT first,
# so that pytest and the bench still write what they have), its output to the
# terminal and to LOG, and its outcome to summary.txt.
step() {
    local name="$1" limit="$2" log="$3"
    shift 3
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "$name: TIMED OUT (the script's time was spent before it could start)" >> "$summary"
        failed=1
        return
    fi
    if [ "$limit" -gt "$left" ]; then
        limit="$left"
    fi
    echo "== $name (limit ${limit} s): $* =="
    local start=$SECONDS
    timeout -s INT -k 5 "$limit" "$@" 2>&1 | tee "$log"
    local rc="${PIPESTATUS[0]}"
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        echo "$name: ok (${took} s)" >> "$summary"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name: TIMED OUT after ${limit} s (exit $rc; see $log)" >> "$summary"
        failed=1
    else
        echo "$name: FAILED (exit $rc after ${took} s; see $log)" >> "$summary"
        failed=1
    fi
}

skip() {
    echo "== $1: skipped ($2) =="
    echo "$1: skipped ($2)" >> "$summary"
}

# 1. the machine
if command -v nvidia-smi > /dev/null 2>&1; then
    step nvidia-smi 10 "$out/nvidia-smi.txt" nvidia-smi
else
    skip nvidia-smi "not on PATH"
fi
step info 20 "$out/info.txt" "$python" -m fastattn info
# the checkout's fastattn, on a GPU that numba sees (not the simulator)
step gpu 30 "$out/gpu.txt" "$python" -c '
import os, sys
import fastattn
from numba import config, cuda
print("fastattn imported from", fastattn.__file__)
here = os.path.realpath(os.path.join(sys.argv[1], "fastattn"))
assert os.path.realpath(os.path.dirname(fastattn.__file__)) == here, "expected the checkout fastattn in " + here
assert not config.ENABLE_CUDASIM, "the CUDA simulator is on"
assert cuda.is_available(), "numba sees no CUDA GPU"
cuda.detect()
' "$repo"

# 2. the CUDA tests on the device
step "pytest -m cuda" 180 "$out/pytest_cuda.log" \
    "$python" -m pytest -m cuda -q -x -p no:cacheprovider --junitxml="$out/pytest_cuda.xml"

# 3. the kernel report (registers, spills, float64, mma), where the checkout has it
if timeout 30 "$python" -m fastattn cuda-report --help > /dev/null 2>&1; then
    step cuda-report 60 "$out/cuda_report.log" "$python" -m fastattn cuda-report --json "$out/cuda_report.json"
else
    skip cuda-report "python -m fastattn cuda-report is not in this checkout"
fi

# 4. the GPU section of the benchmark (its own deadline is 120 s; compiling comes first)
step "bench --backend cuda" 160 "$out/bench_cuda.log" \
    "$python" -m fastattn bench --backend cuda --json "$out/bench_cuda.json"

echo "== summary ($out/summary.txt) =="
cat "$summary"
exit "$failed"
