"""docs/plot_bench.py draws the benchmarks page's plots from a ``bench --json`` report."""
import json
import os
import subprocess
import sys
from pathlib import Path

from dataclasses import asdict

import pytest

from fastattn.bench import dense as bench_dense, paged as bench_paged

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def synthetic_report():
    """A report with the keys ``python -m fastattn bench --json`` writes, over the tiny cases."""
    sweep = [dict(op=c.label, seq=c.seq, flops=c.flops, fastattn_s=1e-6 * c.seq ** 1.5, numpy_s=4e-6 * c.seq ** 1.8,
                  torch_s=2e-6 * c.seq ** 1.5) for c in bench_dense.sweep_cases("tiny")]
    paged_rows = [dict(name=c.label, op=c.op, backend="cpu", dtype=c.dtype, shape=c.shape, case=asdict(c),
                       gb_s=1.0 + i, pct_bandwidth=10.0 * (1 + i), time_ms=1.0, peer_ms=2.0, speedup=2.0, gflops=None)
                  for i, c in enumerate(bench_paged.table("tiny"))]
    torch_rows = [dict(name="paged decode", dtype=paged_rows[0]["dtype"], case=paged_rows[0]["case"], time_ms=1.0,
                       torch_ms=4.0, ratio=0.25)]
    return dict(size="tiny", sweep=sweep, paged_rows=paged_rows, read_bandwidth_gbs=7.5, sgemm_gflops=50.0,
                torch=dict(torch="2.9", rows=torch_rows, note=""),
                machine=dict(cpu=dict(model="Test CPU", cores=2), threads=2, threading_layer="omp"))


def test_torch_decode_rate_is_the_same_bytes_over_torch_time():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import plot_bench
    finally:
        sys.path.pop(0)
    report = synthetic_report()
    rows = [r for r in report["paged_rows"] if r["op"] in plot_bench.DECODE_OPS]
    # the first row moves 1 GB/s x 1 ms = 1 MB; PyTorch took 4 ms: 0.25 GB/s
    assert plot_bench.torch_decode_gbs(report, rows) == [(0, 0.25)]


def test_plot_bench_writes_both_pngs(tmp_path):
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(synthetic_report()), encoding="utf-8")
    out = tmp_path / "plots"
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "plot_bench.py"), str(report), "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    for name in ("seq_sweep.png", "paged_bandwidth.png"):
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"expected a PNG at {png}"


def test_plot_bench_says_what_is_missing(tmp_path):
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(dict(synthetic_report(), sweep=[])), encoding="utf-8")
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "plot_bench.py"), str(report), "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no 'sweep' points" in done.stderr, done.stderr
