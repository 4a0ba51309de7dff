#!/usr/bin/env bash
# Run on a machine with a CUDA GPU:   bash scripts/gpu_check.sh /tmp/gpu_out
#
# The one command for a GPU machine (numba-cuda, CuPy and PyTorch installed, no
# network needed): it records what the machine is, runs the CUDA tests on the
# device (not the simulator), compiles the kernel report, and times the GPU
# section of the benchmark.  Everything goes under OUTDIR:
#   summary.txt        one line per step: ok / FAILED / TIMED OUT / skipped, and its seconds
#   nvidia-smi.txt     nvidia-smi (when present)
#   info.txt           python -m fastattn info
#   gpu.txt            which fastattn was imported; numba, numba-cuda, NVVM and driver versions
#   pytest_cuda_default.log   python -m pytest -m cuda -q, NUMBA_ENABLE_CUDASIM unset, with the
#                      package's own launch config (FASTATTN_TEST_CUDA_CONFIG=default: the kernels users run)
#   pytest_cuda.log    the same with the tests' small launch config (many tiles on tiny shapes)
#   profile.txt        python scripts/gpu_profile.py: kernel time against wall time per call
#   cuda_report.log, cuda_report.json   python -m fastattn cuda-report (when the checkout has it)
#   bench_cuda.log, bench_cuda.json     python -m fastattn bench --backend cuda (with the tensor-core
#                      table: the float16/bfloat16 forward on mma.sync, on the SIMT kernels, and PyTorch's
#                      SDPA at B=4, H=16, N=4096, D=128, timed in turn)
# Each step has its own time limit, cut to what is left of GPU_CHECK_SECONDS
# (default 450); a failing step is recorded and the next one runs; the exit
# status is non-zero if any step failed.  The pytest steps stop after 20
# failures and use pytest-xdist (one worker per core, at most 16) where it is
# installed.  GPU_CHECK_REPORT=0 leaves out the kernel report (it needs no GPU)
# and GPU_CHECK_BENCH=--quick runs the bench's quick grid.  The checkout's
# fastattn is imported through PYTHONPATH (nothing is installed).  Set PYTHON
# to choose the interpreter.
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
# numba-cuda finds NVVM in pip's CUDA packages or in CUDA_HOME; point it at a system toolkit if needed
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/nvvm ] \
        && ! "$python" -c "from numba.cuda.cudadrv import nvvm; nvvm.NVVM()" > /dev/null 2>&1; then
    export CUDA_HOME=/usr/local/cuda
fi

summary="$out/summary.txt"
: > "$summary"
failed=0
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-450}))   # every step's limit is cut to what is left

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
import numba
from numba import config, cuda
from importlib.metadata import version
print("fastattn imported from", fastattn.__file__)
print("numba", numba.__version__, "numba-cuda", version("numba-cuda"))
here = os.path.realpath(os.path.join(sys.argv[1], "fastattn"))
assert os.path.realpath(os.path.dirname(fastattn.__file__)) == here, "expected the checkout fastattn in " + here
assert not config.ENABLE_CUDASIM, "the CUDA simulator is on"
assert cuda.is_available(), "numba sees no CUDA GPU"
cuda.detect()
from numba.cuda.cudadrv import nvvm
print("NVVM", nvvm.NVVM().get_version(), "driver", cuda.cudadrv.driver.driver.get_version())
' "$repo"

# 2. the CUDA tests on the device: first with the launch config users get, then the tests' small one
pytest_args=()
if "$python" -c "import xdist" > /dev/null 2>&1; then
    n="$(nproc 2>/dev/null || echo 1)"
    pytest_args=(-n "$((n < 16 ? n : 16))")
fi
if ! "$python" -c "import dask, distributed" > /dev/null 2>&1; then
    pytest_args+=(--ignore=tests/test_dask.py)   # its module imports dask (no CUDA tests there)
fi
FASTATTN_TEST_CUDA_CONFIG=default step "pytest -m cuda (default config)" 150 "$out/pytest_cuda_default.log" \
    "$python" -m pytest -m cuda -q --maxfail=20 -p no:cacheprovider "${pytest_args[@]}"

# 3. the GPU section of the benchmark (its own deadline; compiling comes first)
step "bench --backend cuda" 170 "$out/bench_cuda.log" \
    "$python" -m fastattn bench --backend cuda ${GPU_CHECK_BENCH:-} --json "$out/bench_cuda.json"

step "pytest -m cuda" 150 "$out/pytest_cuda.log" \
    "$python" -m pytest -m cuda -q --maxfail=20 -p no:cacheprovider "${pytest_args[@]}"

step profile 90 "$out/profile.txt" "$python" scripts/gpu_profile.py

# 4. the kernel report (registers, spills, float64, mma), where the checkout has it
if [ "${GPU_CHECK_REPORT:-1}" = "0" ]; then
    skip cuda-report "GPU_CHECK_REPORT=0"
elif timeout 30 "$python" -m fastattn cuda-report --help > /dev/null 2>&1; then
    step cuda-report 60 "$out/cuda_report.log" "$python" -m fastattn cuda-report --json "$out/cuda_report.json"
else
    skip cuda-report "python -m fastattn cuda-report is not in this checkout"
fi

echo "== summary ($out/summary.txt) =="
cat "$summary"
exit "$failed"
