"""``python -m fastattn info | bench`` run, and the benchmark module counts and compares correctly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastattn
from fastattn.bench import dense as bench_dense
from fastattn.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
    """Run ``python -m fastattn ARGS`` on this checkout; return its stdout."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "fastattn", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_info_reports_versions_threads_cuda_and_cache():
    out = run_cli("info")
    for name in ("fastattn", "numba", "numba-cuda", "llvmlite", "numpy", "scipy", "ml_dtypes"):
        assert f"\n{name} " in f"\n{out}", f"info: expected a {name} version line in\n{out}"
    for label in ("python", "threading layer", "threads", "cuda", "tensor cores", "numba cache", "cpu"):
        assert f"\n{label} " in f"\n{out}", f"info: expected a {label!r} line in\n{out}"
    layer = next(line for line in out.splitlines() if line.startswith("threading layer")).split()[-1]
    assert layer in ("tbb", "omp", "workqueue"), f"info: unexpected threading layer {layer!r}"


#: A cold cache compiles every CPU kernel the bench calls: about 140 s on a 2-core AMD EPYC.
COLD_BENCH_S = 600


def test_bench_tiny_prints_the_table_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    out = run_cli("bench", "--tiny", "--json", str(path), timeout=COLD_BENCH_S)
    assert "GFLOP/s" in out and "% sgemm" in out and "vs NumPy" in out, out
    report = json.loads(path.read_text(encoding="utf-8"))
    cases = bench_dense.table(**{k: bench_dense.SIZES["tiny"][k] for k in ("seq", "heads", "head_dim")})
    cpu_rows = [r for r in report["rows"] if r["backend"] == "cpu"]
    assert [(r["op"], r["causal"], r["dtype"], r["shape"]) for r in cpu_rows] == [
        (c.op, c.causal, c.dtype, c.shape) for c in cases]
    for row in report["rows"]:
        assert row["time_ms"] > 0 and row["gflops"] > 0 and row["speedup"] > 0, row
        assert row["peer_ms"] > 0, row
        assert row["first_call_s"] > 0 and isinstance(row["new_kernels"], list), row
    assert cpu_rows[0]["new_kernels"] == ["forward"], "the first row compiles (or loads) the forward kernel"
    assert report["sgemm_gflops"] > 0 and report["tile_gemm_gflops"] > 0
    assert "versions" in report["machine"] and "cuda" in report["machine"]
    # the sequence-length sweep that docs/plot_bench.py draws
    assert "sequence-length sweep" in out, out
    assert [(p["op"], p["seq"]) for p in report["sweep"]] == [(c.label, c.seq) for c in bench_dense.sweep_cases("tiny")]
    assert all(p["fastattn_s"] > 0 and p["numpy_s"] > 0 for p in report["sweep"]), report["sweep"]
    # without a real GPU the CUDA rows are skipped with a note, never faked
    if not any(r["backend"] == "cuda" for r in report["rows"]):
        assert any("CUDA rows skipped" in note for note in report["notes"]), report["notes"]


def test_bench_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--backend", "tpu"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.parametrize("case, flops", [
    (bench_dense.Case("forward", seq=2048), 4 * 8 * 2048 * 2048 * 64),
    (bench_dense.Case("forward", seq=2048, causal=True), 2 * 8 * 2048 * 2048 * 64),
    (bench_dense.Case("backward", seq=2048, causal=True), 2.5 * 2 * 8 * 2048 * 2048 * 64),
    (bench_dense.Case("forward+backward", seq=1024, causal=True, heads_kv=2), 3.5 * 2 * 8 * 1024 * 1024 * 64),
], ids=["forward", "causal", "backward-causal", "fwd-bwd-causal-gqa"])
def test_flop_counts_follow_flashattention(case, flops):
    assert case.flops == flops


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_numpy_backward_peer_matches_the_reference(causal):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 7, 8))
    k, v = rng.standard_normal((2, 2, 7, 8)), rng.standard_normal((2, 2, 7, 8))
    dout = rng.standard_normal(q.shape)
    out = fastattn.reference.attention(q, k, v, causal=causal)
    ref = fastattn.reference.attention_backward(dout, q, k, v, causal=causal)
    for got in (bench_dense.naive_attention_backward(dout, q, k, v, out, causal=causal),
                bench_dense.naive_forward_backward(dout, q, k, v, causal=causal)):
        for name, g, r in zip(("dq", "dk", "dv"), got, ref):
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12, err_msg=name)


def test_table_formats_one_line_per_row():
    row = dict(name="forward causal", backend="cpu", dtype="float32", shape="1×8×8×64×64", time_ms=1.5,
               gflops=12.25, pct_sgemm=10.0, speedup=3.0)
    lines = bench_dense.format_table([row, dict(row, backend="cuda", pct_sgemm=None)]).splitlines()
    assert len(lines) == 4 and lines[0].startswith("op") and set(lines[1]) <= {"-", " "}
    assert lines[2].split()[-4:] == ["1.50", "12.2", "10%", "3.0×"]
    assert lines[3].split()[-2] == "—"


def test_bench_tiny_reports_the_paged_table(tmp_path):
    path = tmp_path / "bench.json"
    out = run_cli("bench", "--tiny", "--backend", "cpu", "--json", str(path))
    assert "% read bw" in out and "paged / dense decode time" in out and "split-KV" in out, out
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["read_bandwidth_gbs"] > 0
    assert set(report["paged_ratios"]) == {"paged/dense float16", "paged/dense float32", "fp8/f16",
                                           "split-kv speed-up", "bandwidth share float16",
                                           "bandwidth share float32"}
    assert "of the read bandwidth" in out and "timed in turn" in out
    assert all(r > 0 for r in report["paged_ratios"].values())
    from fastattn.bench import paged as bench_paged

    cases = bench_paged.table("tiny")
    assert [(r["op"], r["dtype"], r["shape"]) for r in report["paged_rows"]] == [
        (c.op, c.dtype, c.shape) for c in cases]
    for row in report["paged_rows"]:
        assert row["time_ms"] > 0 and row["gb_s"] > 0 and row["peer_ms"] > 0, row
        assert (row["gflops"] is None) == (row["op"] == "write"), row


@pytest.mark.parametrize("op", ["decode", "dense decode", "prefill", "backward", "write"])
def test_paged_bench_kernel_and_peer_agree(op):
    """The NumPy peer computes what the kernel computes (so the speed-up compares like with like)."""
    from fastattn.bench import paged as bench_paged

    case = bench_paged.PagedCase(op, "float32", batch=2, context=40, heads_q=4, heads_kv=2, head_dim=8,
                                  seq_q=8 if op in ("prefill", "backward", "write") else 1)
    x = bench_paged.make_inputs(case)
    if op == "write":
        before = x["k_cache"].copy(), x["v_cache"].copy()
        bench_paged.kernel(case, x)()
        ours = x["k_cache"].copy(), x["v_cache"].copy()
        x["k_cache"][:], x["v_cache"][:] = before
        bench_paged.peer(case, x)()
        np.testing.assert_array_equal(ours[0], x["k_cache"])
        np.testing.assert_array_equal(ours[1], x["v_cache"])
        return
    got = bench_paged.kernel(case, x)()
    expected = bench_paged.peer(case, x)()
    if op != "backward":
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-5)


def test_bench_tiny_reports_the_projection_table(tmp_path):
    path = tmp_path / "bench.json"
    out = run_cli("bench", "--tiny", "--backend", "cpu", "--json", str(path))
    assert "÷ bare matmul" in out and "vs unfused" in out, out
    report = json.loads(path.read_text(encoding="utf-8"))
    from fastattn.bench import projection as bench_projection

    assert [(r["op"], r["dtype"]) for r in report["projection_rows"]] == [
        (c.op, c.dtype) for c in bench_projection.table("tiny")]
    for row in report["projection_rows"]:
        assert row["time_ms"] > 0 and row["peer_ms"] > 0 and row["gflops"] > 0, row
        assert (row["vs_bare"] is None) == (row["op"] == "layer"), row


@pytest.mark.parametrize("op", ["qkv", "output", "qkv backward", "output backward"])
def test_projection_bench_peers_compute_the_same(op):
    from fastattn.bench import projection as bench_projection

    case = bench_projection.ProjectionCase(op, "float32", batch=2, seq=5, hidden=16, heads_q=4, heads_kv=2,
                                            head_dim=4)
    x = bench_projection.make_inputs(case)
    got = bench_projection.kernel(case, x)()
    expected = bench_projection.unfused(case, x)()
    single = op == "output"
    for a, b in zip([got] if single else got, [expected] if single else expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if op.endswith("backward"):  # the bare GEMMs are the same input and weight gradients
        dx, dw = bench_projection.bare(case, x)()
        np.testing.assert_allclose(dx.reshape(got[0].shape), got[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dw, got[1], rtol=1e-5, atol=1e-5)


def test_precompile_calls_the_chosen_operations(capsys):
    assert main(["precompile", "--ops", "gqa,attention", "--dtypes", "float32", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "[1/2] gqa" in out and "[2/2] attention" in out and "precompiled 2 operation groups" in out, out


def test_precompile_rejects_an_unknown_operation(capsys):
    with pytest.raises(SystemExit):
        main(["precompile", "--ops", "everything"])
    assert "expected names from attention,paged" in capsys.readouterr().err


# --- bench --peers: PyTorch side by side ----------------------------------------------------

def test_peers_section_says_why_without_torch(monkeypatch):
    import io

    from fastattn.bench import torch_peers as bench_torch

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    stream = io.StringIO()
    section = bench_torch.run("tiny", stream)
    assert section == dict(torch=None, rows=[], note=section["note"])
    assert section["note"].startswith("PyTorch rows skipped: torch is not installed")
    assert 'fastattn[compare]' in stream.getvalue()


def test_peers_table_formats_one_line_per_row():
    from fastattn.bench import torch_peers as bench_torch

    rows = [dict(name="forward", dtype="float32", shape="1×8×8×128×64", time_ms=2.0, torch_ms=4.0, ratio=0.5)]
    lines = bench_torch.format_table(rows).splitlines()
    assert lines[0].split() == ["op", "dtype", "shape", "fastattn", "ms", "torch", "ms", "fastattn/torch"]
    assert lines[2].split()[-3:] == ["2.00", "4.00", "0.50"]


def test_peers_cases_cover_the_issue_list():
    from fastattn.bench import torch_peers as bench_torch

    labels = [label for label, _ in bench_torch.cases("tiny")]
    for label in ("forward", "forward causal", "forward+backward causal", "forward GQA", "dense decode",
                  "paged decode", "paged prefill", "qkv projection", "output projection",
                  "layer forward+backward"):
        assert label in labels


@pytest.mark.parametrize("index", range(11))
def test_peers_compute_what_fastattn_computes(index):
    """Each PyTorch peer returns fastattn's result (so the ratio compares like with like)."""
    torch = pytest.importorskip("torch")  # an optional peer: the compare extra
    from fastattn.bench import torch_peers as bench_torch

    label, case = bench_torch.cases("tiny")[index]
    ours, theirs = bench_torch.pair(torch, case)
    got, expected = ours(), theirs()
    if label == "layer forward+backward":  # different weights: only the shapes can agree
        assert len(expected) == 1 + len(list(torch.nn.MultiheadAttention(8, 2).parameters()))
        return
    got = got if isinstance(got, (tuple, list)) else [got]
    expected = expected if isinstance(expected, (tuple, list)) else [expected]
    # float16 results are rounded by both sides (outputs below 2 in magnitude: an ulp is at most 2**-10);
    # float32 sums of up to a few hundred products
    tol = 4 * 2.0 ** -10 if case.dtype == "float16" else 1e-4
    for a, b in zip(got, expected):
        b = b.detach().float().numpy()
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol)


def test_bench_modules_import_each_other_without_a_circle():
    """fastattn/bench: core imports no sibling, and the sibling imports form no cycle."""
    import ast

    folder = Path(fastattn.__file__).parent / "bench"
    names = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[name] = deps & names
    assert graph["core"] == set(), graph
    done = set()

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, path + [name])
        done.add(name)
    for name in names:
        visit(name, [])
