"""The GPU section of ``python -m fastattn bench`` and ``scripts/gpu_check.sh``, without a GPU.

The accounting, the in-turn timing, the tables and the skip messages are
plain Python; the case builders run under the simulator (``-m cuda``) on tiny
shapes.  Timings themselves need a real GPU: ``bash scripts/gpu_check.sh``.
"""
import io
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

import fastattn
import fastattn.bench
from conftest import CUDA, CUDA_TEST_CONFIG, cuda_unavailable_reason
from fastattn.bench import core as bench_core, dense as bench_dense, gpu as bench_gpu, paged as bench_paged
from fastattn.bench.dense import Case
from fastattn.bench.paged import PagedCase

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


# --- the cases and their accounting -----------------------------------------------------

def test_dense_grid_covers_every_dtype_length_head_dim_and_mask():
    cases = bench_gpu.dense_cases("full")
    assert {(c.dtype, c.seq, c.head_dim, c.causal, c.op) for c in cases} == {
        (dtype, seq, d, causal, op) for dtype in ("float32", "float16", "bfloat16") for seq in (1024, 4096, 16384)
        for d in (64, 128) for causal in (False, True) for op in ("forward", "backward")}
    assert len(cases) == 72
    assert all(c.batch * c.heads_q * c.seq == bench_gpu.TOKENS and c.heads_kv == c.heads_q for c in cases)
    seqs = [c.seq for c in cases]
    assert seqs == sorted(seqs), "short sequences first, so that the deadline cuts the longest"


@pytest.mark.parametrize("seq, shape", [(1024, (4, 16)), (4096, (1, 16)), (16384, (1, 4)), (65536, (1, 1))])
def test_dense_shape_keeps_the_tokens_fixed(seq, shape):
    assert bench_gpu.dense_shape(seq) == shape


@pytest.mark.parametrize("case, flops", [
    (Case("forward", seq=4096, heads_q=16, heads_kv=16, batch=1, head_dim=128), 4 * 16 * 4096 * 4096 * 128),
    (Case("forward", seq=4096, causal=True, heads_q=16, heads_kv=16, batch=1, head_dim=128),
     2 * 16 * 4096 * 4096 * 128),
    (Case("backward", seq=1024, heads_q=16, heads_kv=16, batch=4, head_dim=64), 2.5 * 4 * 4 * 16 * 1024 ** 2 * 64),
], ids=["forward", "causal", "backward"])
def test_dense_rows_count_flops_and_the_ratio(case, flops):
    row = bench_gpu.dense_row(case, 2e-3, 1e-3, torch_seconds=1e-3, torch_best=1e-3)
    assert row["flops"] == flops
    assert row["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert row["torch_tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert row["ratio"] == pytest.approx(0.5)
    alone = bench_gpu.dense_row(case, 2e-3, 1e-3)
    assert alone["torch_tflops"] is None and alone["ratio"] is None
    json.dumps(row)


def test_decode_rows_count_the_kv_cache_against_the_copy_rate():
    cases = bench_gpu.decode_cases("full")
    assert {(c.dtype, c.batch, c.context) for c in cases} == {
        (dtype, b, ctx) for dtype in ("float16", "float8_e4m3fn") for b in (8, 32) for ctx in (4096, 16384)}
    assert all((c.heads_q, c.heads_kv, c.head_dim, c.block_size, c.seq_q) == (32, 8, 128, 16, 1) for c in cases)
    case = PagedCase("decode", "float16", batch=32, context=16384, heads_q=32, heads_kv=8, head_dim=128)
    assert case.kv_bytes == 2 * 32 * 16384 * 8 * 128 * 2
    row = bench_gpu.paged_row(case, case.kv_bytes / 2e12, None, copy_gbs=4000.0)
    assert row["gb_s"] == pytest.approx(2000.0) and row["pct_copy"] == pytest.approx(50.0)
    fp8 = PagedCase("decode", "float8_e4m3fn", batch=32, context=16384, heads_q=32, heads_kv=8, head_dim=128)
    assert fp8.kv_bytes * 2 == case.kv_bytes
    assert bench_gpu.paged_row(case, 1.0, 1.0, copy_gbs=None)["pct_copy"] is None  # copy not measured


def test_copy_rate_counts_bytes_read_and_written():
    assert bench_gpu.copy_rate(10 ** 9, 1.0) == 2.0


# --- timing in turn ---------------------------------------------------------------------

@pytest.mark.parametrize("seconds, calls", [(1e-5, 50), (1e-3, 10), (4e-3, 2), (0.5, 1), (0.0, 50)])
def test_calls_per_sample(seconds, calls):
    assert bench_gpu.calls_per_sample(seconds) == calls


class FakeClock:
    """A clock that advances by the seconds the fake timers report."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_timers(clock, log, times):
    def make(name, seconds):
        def timer():
            log.append(name)
            clock.now += seconds
            return seconds
        return timer
    return [make(name, seconds) for name, seconds in times.items()]


def test_in_turn_alternates_and_stops_at_the_repeat_count():
    clock, log = FakeClock(), []
    samples = bench_gpu.in_turn(fake_timers(clock, log, {"ours": 0.01, "torch": 0.02}), repeats=3,
                                  budget_s=10.0, clock=clock)
    assert log == ["ours", "torch"] * 3
    assert samples == [[0.01] * 3, [0.02] * 3]


def test_in_turn_stops_once_the_budget_is_spent_after_a_whole_round():
    clock, log = FakeClock(), []
    samples = bench_gpu.in_turn(fake_timers(clock, log, {"ours": 0.3, "torch": 0.1}), repeats=10,
                                  budget_s=0.7, clock=clock)
    assert log == ["ours", "torch"] * 2  # 0.4 s after one round, 0.8 s after two
    assert [len(s) for s in samples] == [2, 2]
    clock, log = FakeClock(), []
    bench_gpu.in_turn(fake_timers(clock, log, {"ours": 5.0}), repeats=10, budget_s=0.0, clock=clock)
    assert log == ["ours"], "one round always runs"


# --- tables and messages ----------------------------------------------------------------

def test_tables_format_rows_failures_and_missing_peers():
    case = Case("forward", seq=1024, causal=True, heads_q=16, heads_kv=16, batch=4, head_dim=64)
    rows = [bench_gpu.dense_row(case, 2e-3, 1e-3, torch_seconds=1e-3, torch_best=1e-3, torch_diff=3e-4),
            bench_gpu.dense_row(case, 2e-3, 1e-3),
            bench_gpu.dense_row(case, None, None, error="CudaAPIError: out of memory")]
    lines = bench_gpu.format_dense(rows).splitlines()
    assert len(lines) == 5 and lines[0].startswith("op") and set(lines[1]) <= {"-", " "}
    tflops = f"{case.flops / 2e-3 / 1e12:.2f}"
    assert lines[2].split()[-6:] == ["2.000", tflops, "1.000", f"{case.flops / 1e-3 / 1e12:.2f}", "0.50", "0.0003"]
    assert lines[3].split()[-6:] == ["2.000", tflops, "—", "—", "—", "—"]
    assert lines[4].split()[-6:] == ["failed", "—", "—", "—", "—", "—"]
    paged = PagedCase("decode", "float8_e4m3fn", batch=8, context=4096, heads_q=32, heads_kv=8, head_dim=128)
    lines = bench_gpu.format_decode([bench_gpu.paged_row(paged, paged.kv_bytes / 1e12, None, 4000.0),
                                       bench_gpu.paged_row(paged, None, None, 4000.0, error="x")]).splitlines()
    assert lines[0].endswith("KV GB/s  % copy bw")
    assert lines[2].split()[-3:] == [f"{paged.kv_bytes / 1e9:.3f}", "1000", "25%"]
    assert lines[3].split()[-3:] == ["failed", "—", "—"]


def test_torch_columns_say_why_they_are_skipped(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    torch, why = bench_gpu.torch_status()
    assert torch is None and why.startswith("PyTorch columns skipped: torch is not installed")
    cpu_only = types.SimpleNamespace(__version__="2.9.0+cpu", cuda=types.SimpleNamespace(is_available=lambda: False))
    monkeypatch.setitem(sys.modules, "torch", cpu_only)
    torch, why = bench_gpu.torch_status()
    assert torch is None and "torch 2.9.0+cpu sees no GPU" in why and "is_available() is False" in why
    gpu = types.SimpleNamespace(__version__="2.9.0", cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", gpu)
    assert bench_gpu.torch_status() == (gpu, "")


def test_bench_without_a_gpu_says_why_the_gpu_section_is_skipped(monkeypatch, tmp_path):
    reason = "CUDA rows skipped: no CUDA GPU found"
    monkeypatch.setattr(fastattn.bench, "cuda_status", lambda: (False, reason))
    monkeypatch.setattr(bench_gpu, "run", lambda *a: pytest.fail("the GPU section ran without a GPU"))
    stream, path = io.StringIO(), tmp_path / "bench.json"
    assert fastattn.bench.run("tiny", ("cuda",), json_path=str(path), stream=stream) == []
    out = stream.getvalue()
    assert reason in out and "TFLOP/s" not in out and "read bandwidth" not in out, out
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["gpu"] == {"skipped": reason} and report["rows"] == [] and report["paged_rows"] == []


# --- scripts/gpu_check.sh ---------------------------------------------------------------

def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_gpu_check_script_names_each_step():
    text = SCRIPT.read_text(encoding="utf-8")
    assert "bash scripts/gpu_check.sh /tmp/gpu_out" in text.splitlines()[1]
    for step in ("nvidia-smi", '-m fastattn info', "-m pytest -m cuda -q", "unset NUMBA_ENABLE_CUDASIM",
                 "FASTATTN_TEST_CUDA_CONFIG=default",
                 "-m fastattn cuda-report --help", 'cuda-report --json "$out/cuda_report.json"',
                 'bench --backend cuda ${GPU_CHECK_BENCH:-} --json "$out/bench_cuda.json"', "timeout", 'PYTHONPATH="$repo'):
        assert step in text, f"scripts/gpu_check.sh: expected {step!r}"
    assert "pip install" not in text, "the GPU machine has no network"


STUB = """#!/usr/bin/env bash
args="$*"
echo "${args//$'\n'/ } | sim=${NUMBA_ENABLE_CUDASIM-unset} | path=${PYTHONPATH%%:*}" >> "$STUB_LOG"
case "$*" in
    "-m pytest "*) echo "1 failed"; exit 1 ;;
esac
exit 0
"""


@pytest.mark.skipif(not (shutil.which("timeout") and shutil.which("tee")), reason="needs coreutils timeout and tee")
def test_gpu_check_script_runs_every_step_records_failures_and_goes_on(tmp_path):
    stub, log, out = tmp_path / "python", tmp_path / "calls.txt", tmp_path / "out"
    stub.write_text(STUB, encoding="utf-8")
    stub.chmod(0o755)
    env = dict(os.environ, PYTHON=str(stub), STUB_LOG=str(log), NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split(":")[0] for line in summary] == [
        "nvidia-smi", "info", "gpu", "pytest -m cuda (default config)", "bench --backend cuda", "pytest -m cuda",
        "profile", "cuda-report"]
    for failed in (3, 5):
        assert summary[failed].split(": ")[1].startswith("FAILED (exit 1"), summary
    assert all(summary[ok].split(": ")[1].startswith("ok") for ok in (4, 6, 7)), summary
    calls = log.read_text(encoding="utf-8").splitlines()
    assert all(call.endswith(f"sim=unset | path={ROOT}") for call in calls), calls
    assert any(c.startswith(f"-m fastattn bench --backend cuda --json {out}/bench_cuda.json") for c in calls), calls
    assert calls[-1].startswith(f"-m fastattn cuda-report --json {out}/cuda_report.json"), calls
    for name in ("pytest_cuda.log", "pytest_cuda_default.log"):
        assert "1 failed" in (out / name).read_text(encoding="utf-8")


# --- the builders under the simulator (tiny shapes) ---------------------------------------

@pytest.fixture
def cuda(monkeypatch):
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)
    for name, value in CUDA_TEST_CONFIG.items():
        if hasattr(fastattn.config, name):  # the simulator's small launch config, as far as this config has it
            monkeypatch.setattr(fastattn.config, name, value)
    from numba import cuda

    return cuda


@CUDA
def test_device_random_repeats_one_host_chunk(cuda):
    rng = np.random.default_rng(0)
    dev = bench_gpu.device_random((7, 2, 3), bench_core.numpy_dtype("float8_e4m3fn"), rng,
                                    chunk_bytes=2 * 2 * 3)
    host = dev.copy_to_host()
    assert host.shape == (7, 2, 3) and host.dtype == bench_core.numpy_dtype("float8_e4m3fn")
    values = host.astype(np.float32)
    np.testing.assert_array_equal(values[0:2], values[2:4])
    np.testing.assert_array_equal(values[0], values[6])
    assert np.isfinite(values).all() and np.ptp(values) > 0


@CUDA
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_bench_builders_feed_the_kernels(cuda, dtype):
    case = Case("backward", dtype=dtype, seq=6, heads_q=2, heads_kv=2, batch=1, head_dim=8)
    x = bench_gpu.dense_inputs(case)
    x["out"], x["lse"] = fastattn.attention(x["q"], x["k"], x["v"], return_lse=True)
    dq, dk, dv = bench_dense.kernel(case, x)()
    assert dq.shape == dk.shape == dv.shape == (1, 2, 6, 8)
    assert np.isfinite(dq.copy_to_host().astype(np.float32)).all()


@CUDA
def test_gpu_bench_decode_builder_feeds_the_fp8_kernel(cuda):
    case = PagedCase("decode", "float8_e4m3fn", batch=2, context=9, heads_q=4, heads_kv=2, head_dim=8, block_size=4)
    x = bench_gpu.paged_inputs(case)
    assert x["block_table"].shape == (2, 3) and x["k_cache"].shape == (6, 4, 2, 8)
    out = bench_paged.kernel(case, x)().copy_to_host()
    assert out.shape == (2, 4, 1, 8) and np.isfinite(out).all()


@CUDA
def test_gpu_section_runs_its_cases_and_lists_those_past_the_deadline(cuda, monkeypatch):
    """The whole section on tiny shapes (wall-clock timers: the simulator's events measure nothing)."""
    def wall_timer(fn, calls=1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    monkeypatch.setitem(bench_gpu.SIZES, "sim", dict(
        seqs=(8,), head_dims=(8,), dtypes=("float16",), ops=("forward",), decode=((1, 12),), repeats=1,
        case_budget_s=0.0, budget_s=60.0, copy_mib=1, tensor_cores=()))
    monkeypatch.setattr(bench_gpu, "DECODE", dict(heads_q=4, heads_kv=2, head_dim=8, block_size=4))
    monkeypatch.setattr(bench_gpu, "DECODE_DTYPES", ("float8_e4m3fn",))
    monkeypatch.setattr(bench_gpu, "TOKENS", 16)
    monkeypatch.setattr(bench_gpu, "event_timer", wall_timer)
    monkeypatch.setattr(bench_gpu, "device_name", lambda: "the simulator")
    monkeypatch.setattr(bench_gpu, "torch_status", lambda: (None, "PyTorch columns skipped: a test"))
    stream = io.StringIO()
    section = bench_gpu.run("sim", stream)
    json.dumps(section)
    assert [(r["op"], r["dtype"]) for r in section["decode_rows"]] == [("decode", "float8_e4m3fn")]
    assert [(r["op"], r["dtype"], r["shape"]) for r in section["dense_rows"]] == [
        ("forward", "float16", "1×2×2×8×8"), ("forward", "float16", "1×2×2×8×8")]
    rows = section["decode_rows"] + section["dense_rows"]
    assert all(r["error"] is None and r["seconds"] > 0 for r in rows), rows
    assert section["tensor_core_rows"] == []
    assert section["skipped"] == [] and section["notes"] == ["PyTorch columns skipped: a test"]
    out = stream.getvalue()
    assert "% copy bw" in out and "fastattn/torch" in out and "PyTorch columns skipped: a test" in out, out

    monkeypatch.setitem(bench_gpu.SIZES["sim"], "budget_s", 0.0)
    section = bench_gpu.run("sim", io.StringIO())
    assert section["decode_rows"] == section["dense_rows"] == [] and len(section["skipped"]) == 3
    assert section["notes"][-1] == "3 of 3 cases skipped: the section's 0 s budget was spent"


def test_tensor_core_cases_are_the_issue_shape_in_both_16_bit_types():
    cases = bench_gpu.tensor_core_cases("full")
    assert [(c.dtype, c.causal, c.shape, c.op) for c in cases] == [
        (dtype, causal, "4×16×16×4096×128", "forward") for dtype in ("float16", "bfloat16") for causal in (False, True)]


@CUDA
def test_tensor_core_row_times_mma_simt_and_torch_in_turn(cuda, monkeypatch):
    """One row of the tensor-core table (wall-clock timers; the emulated mma waits on thread switches)."""
    def wall_timer(fn, calls=1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    monkeypatch.setattr(bench_gpu, "event_timer", wall_timer)
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    try:
        case = bench_gpu.Case("forward", dtype="bfloat16", seq=8, causal=True, heads_q=1, heads_kv=1, batch=1,
                              head_dim=8)
        stream = io.StringIO()
        row = bench_gpu.measure_tensor_cores(case, bench_gpu.dense_inputs(case, None),
                                             dict(repeats=1, case_budget_s=0.0), None, stream)
    finally:
        sys.setswitchinterval(before)
    assert row["error"] is None and row["mma_seconds"] > 0 and row["simt_seconds"] > 0, row
    assert row["torch_seconds"] is None and row["simt_diff"] < 1e-2, row
    assert fastattn.config.cuda_mma is False, "the suite's setting is restored"
    table = bench_gpu.format_tensor_cores([row, dict(row, error="boom")])
    assert "mma/SIMT" in table and "failed" in table, table
