"""``python -m fastattn cuda-report`` and the rules DESIGN.md sets for the CUDA kernels.

The parsers and the occupancy calculator are checked on fixed ptxas reports and
known cases; tiny kernels go through NVVM and ptxas end to end; then every
kernel variant (D = 64 and 128) is compiled once for sm_80 and assembled for
sm_80 and sm_90, and each rule is its own test over the rows.  These are CPU
tests (NVVM and ptxas from pip, no GPU): they skip, saying why, only without
NVVM/ptxas or under the CUDA simulator.
"""
import functools
import json
import math
import os

import pytest
from numba import cuda, float32, float64

from fastattn import _cuda_report, _ptxas
from fastattn.__main__ import main
from fastattn.cuda import _mma
from fastattn.cuda._launch import Variant

REASON = _cuda_report.missing_toolchain()
needs_toolchain = pytest.mark.skipif(REASON is not None, reason=str(REASON))

HEAD_DIMS = (64, 128)
#: Where the rule tests look: cc label -> (ptxas target, NVVM target).  sm_80 PTX
#: assembles for sm_90 too, so one NVVM compile per kernel serves both reports.
TARGETS = {"sm90": ((9, 0), (8, 0)), "sm80": ((8, 0), (8, 0))}
FLOATS = ("float32", "float64", "float16", "bfloat16")
FP8 = ("float8_e4m3fn", "float8_e5m2")
MIN_OCCUPANCY = {"forward": 0.25, "decode": 0.5}

PTXAS_REPORT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fastattn7forwardE' for 'sm_90'
ptxas info    : Function properties for _ZN8fastattn7forwardE
    24 bytes stack frame, 16 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 33280 bytes smem, 920 bytes cmem[0]
ptxas info    : Compile time = 41.301 ms
ptxas info    : Function properties for __internal_accurate_pow
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""


# --- parsing and occupancy, on fixed inputs --------------------------------------------------------

def test_parse_ptxas_reads_registers_spills_stack_and_smem():
    assert _cuda_report.parse_ptxas(PTXAS_REPORT) == {
        "registers": 168, "spill_bytes": 36, "stack_frame": 32, "smem_static": 33280}


def test_parse_ptxas_without_shared_memory_or_spills():
    text = ("ptxas info    : Function properties for k\n"
            "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
            "ptxas info    : Used 30 registers, used 0 barriers, 384 bytes cmem[0]\n")
    assert _cuda_report.parse_ptxas(text) == {"registers": 30, "spill_bytes": 0, "stack_frame": 0,
                                              "smem_static": 0}


@pytest.mark.parametrize("cc, threads, registers, smem, expected", [
    ((9, 0), 256, 32, 0, 1.0),
    ((9, 0), 256, 64, 0, 0.5),         # 64 regs x 2048 threads would need 2x the register file
    ((9, 0), 256, 128, 0, 0.25),
    ((9, 0), 256, 40, 0, 0.75),        # 1280 regs a warp: 12 warps a quarter, 48 in all, 6 blocks
    ((9, 0), 64, 32, 48 * 1024, 0.125),  # 49 KiB a block with the driver's 1 KiB: 4 in 228 KiB
    ((8, 0), 64, 32, 48 * 1024, 0.09375),  # 3 in 164 KiB
    ((9, 0), 1024, 255, 0, 0.0),       # does not fit in the register file at all
    ((9, 0), 128, 16, 228 * 1024, 0.0),  # over the 227 KiB a block may have
    ((9, 0), 32, 16, 0, 0.5),          # 32 blocks of one warp: the block limit
    ((8, 6), 512, 32, 0, 1.0),         # 3 blocks of 16 warps fill the 48 warps of sm_86
    ((7, 5), 256, 64, 0, 1.0),         # 1024 threads an SM on sm_75
], ids=["sm90-r32", "sm90-r64", "sm90-r128", "sm90-r40", "sm90-smem48k", "sm80-smem48k", "sm90-r255-t1024",
        "sm90-smem-too-big", "sm90-block-limit", "sm86-t512", "sm75-r64"])
def test_occupancy_matches_the_calculator(cc, threads, registers, smem, expected):
    assert _cuda_report.occupancy(cc, threads, registers, smem) == expected


def test_occupancy_rejects_an_unknown_compute_capability():
    with pytest.raises(ValueError, match=r"cc: expected a compute capability .* got \(6, 1\)"):
        _cuda_report.occupancy((6, 1), 128, 32, 0)


PTX_SNIPPET = """\
.visible .entry kernel(
\t.param .f64 kernel_param_0
)
{
\t.reg .f64 \t%fd<8>;
\t.reg .f32 \t%f<8>;
\t// add.f64 in a comment does not count
\tld.param.f64 \t%fd1, [kernel_param_0];
\tcvt.f64.f32 \t%fd2, %f1;
\tfma.rn.f64 \t%fd3, %fd1, %fd2, %fd2;
\t@%p1 bra \t$L__BB0_2;
\tcvt.rn.f32.f64 \t%f2, %fd3;
\tmul.f32 \t%f3, %f2, %f2;
$L__BB0_2:
\t{ // callseq 0, 0
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f4, %f5, %f6, %f7}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f4, %f5, %f6, %f7};
\t}
\t@!%p2 wmma.mma.sync.aligned.row.col.m16n16k16.f32.f16 {%f1}, {%r1}, {%r2}, {%f1};
\tret;
}
"""


def test_count_f64_counts_instructions_not_declarations_or_comments():
    assert _cuda_report.count_f64(PTX_SNIPPET) == 4
    assert _cuda_report.count_f64("\t.reg .f64 %fd<3>;\n\tadd.f32 %f1, %f2, %f3;\n") == 0


def test_count_mma_counts_mma_and_wmma():
    assert _cuda_report.count_mma(PTX_SNIPPET) == 2
    assert _cuda_report.count_mma("\tfma.rn.f32 %f1, %f2, %f3, %f4;\n") == 0


def test_violations_names_each_broken_rule():
    good = dict(kernel="forward", role="forward", dtype="float16", head_dim=64, compiles=True, f64_ops=0,
                spill_bytes=0, stack_frame=0, smem_static=16384, occupancy=0.5)
    rows = [dict(good, dtype=d, role=role) for d in FLOATS + FP8 for role in ("forward", "backward")]
    assert _cuda_report.violations(rows) == {}
    bad = [dict(good, kernel="spills", spill_bytes=4), dict(good, kernel="f64", f64_ops=2),
           dict(good, kernel="stack", stack_frame=8), dict(good, kernel="smem", smem_static=48 * 1024 + 4),
           dict(good, kernel="low", occupancy=0.125), dict(good, kernel="decode", role="decode", occupancy=0.375),
           dict(good, kernel="broken", compiles=False, spill_bytes=None),
           dict(good, kernel="forward-mma", mma_ops=0), dict(good, kernel="fine-mma", mma_ops=32)]
    assert _cuda_report.violations(rows + bad) == {
        "compiles": ["broken-float16-d64"], "no float64 instructions": ["f64-float16-d64"],
        "no spills": ["spills-float16-d64"], "no stack frame": ["stack-float16-d64"],
        "static smem <= 48 KiB": ["smem-float16-d64"], "occupancy >= 25%": ["low-float16-d64"],
        "occupancy >= 50%": ["decode-float16-d64"], "mma in tensor-core kernels": ["forward-mma-float16-d64"]}
    assert list(_cuda_report.violations(rows[2:])) == ["missing"]


def test_format_table_prints_percent_and_dashes_for_a_kernel_that_does_not_compile():
    row = dict.fromkeys(_cuda_report.KEYS)
    row.update(kernel="forward", role="forward", dtype="float16", head_dim=64, block_threads=128, registers=72,
               spill_bytes=0, stack_frame=0, smem_static=16384, occupancy=0.375, f64_ops=0, mma_ops=8,
               compiles=True)
    broken = dict(row, kernel="dkdv", registers=None, spill_bytes=None, stack_frame=None, smem_static=None,
                  occupancy=None, compiles=False)
    lines = _cuda_report.format_table([row, broken]).splitlines()
    assert lines[0].split()[:4] == ["kernel", "role", "dtype", "head"] and "occupancy" in lines[0]
    assert lines[2].split() == ["forward", "forward", "float16", "64", "128", "72", "0", "0", "16384", "38%",
                                "0", "8"]
    assert lines[3].split()[5:10] == ["—"] * 5


# --- tiny kernels through NVVM and ptxas -----------------------------------------------------------

def scale_f32(x, out):
    """float32 only: the float32 literal and the shared array keep it so."""
    buf = cuda.shared.array(256, float32)
    i = cuda.grid(1)
    buf[cuda.threadIdx.x] = x[i] if i < x.size else float32(0)
    cuda.syncthreads()
    if i < x.size:
        out[i] = buf[cuda.threadIdx.x] * float32(2)


def sqrt_through_f64(x, out):
    """float32 in and out, float64 arithmetic inside: what the f64 rule is there to catch."""
    i = cuda.grid(1)
    if i < x.size:
        out[i] = math.sqrt(float64(x[i])) + 0.5


def too_much_shared(x, out):
    """256 KiB of static shared memory: ptxas refuses it on every compute capability."""
    buf = cuda.shared.array(65536, float32)
    buf[cuda.threadIdx.x] = x[cuda.threadIdx.x]
    cuda.syncthreads()
    out[cuda.threadIdx.x] = buf[65535 - cuda.threadIdx.x]


F32_ARGS = (float32[::1], float32[::1])
TINY = [Variant("scale", "forward", "float32", 64, 256, scale_f32, F32_ARGS),
        Variant("sqrt", "forward", "float32", 64, 128, sqrt_through_f64, F32_ARGS),
        Variant("huge", "other", "float32", 64, 256, too_much_shared, F32_ARGS)]


@needs_toolchain
def test_tiny_kernels_end_to_end(tmp_path):
    rows = _cuda_report.report((9, 0), ptx_dir=tmp_path, variants=TINY)
    scale, sqrt, huge = rows
    assert all(set(r) == set(_cuda_report.KEYS) for r in rows)
    assert scale["compiles"] and scale["error"] is None, scale
    assert scale["f64_ops"] == 0 and scale["mma_ops"] == 0 and scale["spill_bytes"] == 0, scale
    assert scale["smem_static"] == 1024 and 0 < scale["registers"] <= 32 and scale["occupancy"] == 1.0, scale
    assert scale["ptx_file"] == str(tmp_path / "scale-float32-d64.ptx")
    assert ".target sm_90" in (tmp_path / "scale-float32-d64.ptx").read_text(encoding="utf-8")
    assert sqrt["compiles"] and sqrt["f64_ops"] > 0, sqrt
    assert not huge["compiles"] and "shared" in huge["error"] and huge["occupancy"] is None, huge
    assert _cuda_report.violations(rows) == {
        "compiles": ["huge-float32-d64"], "no float64 instructions": ["sqrt-float32-d64"],
        "missing": [f"{role}-{dtype}" for role in ("forward", "backward") for dtype in FLOATS if
                    (role, dtype) != ("forward", "float32")] + [f"any-{dtype}" for dtype in FP8]}


@needs_toolchain
def test_compile_passes_fastmath_of_the_variant_or_its_dispatcher(monkeypatch):
    seen = []
    monkeypatch.setattr(cuda, "compile_ptx", lambda func, sig, **options: seen.append(options) or ("", None))

    def kernel(x, out):
        out[0] = x[0]

    plain = Variant("k", "other", "float32", 0, 32, kernel, F32_ARGS)
    _cuda_report.compile_variant(plain, (8, 0))
    _cuda_report.compile_variant(Variant("k", "other", "float32", 0, 32, cuda.jit(fastmath=True)(kernel),
                                         F32_ARGS), (8, 6))
    assert [s["fastmath"] for s in seen] == [False, True] and [s["cc"] for s in seen] == [(8, 0), (8, 6)]


# --- the command line ------------------------------------------------------------------------------

@needs_toolchain
def test_cli_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(_cuda_report, "collect_variants", lambda head_dims=None: asked.append(head_dims) or TINY[:2])
    path = tmp_path / "report.json"
    assert main(["cuda-report", "--head-dims", "64", "--json", str(path), "--ptx-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert asked == [(64,)]
    assert "registers" in out and "sm_90" in out and "scale" in out, out
    assert "rule violations:" in out and "no float64 instructions (1 row)" in out, out
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert [r["kernel"] for r in rows] == ["scale", "sqrt"]
    assert set(rows[0]) == {"kernel", "role", "dtype", "head_dim", "block_threads", "registers", "spill_bytes",
                            "stack_frame", "smem_static", "occupancy", "f64_ops", "mma_ops", "compiles",
                            "ptx_file", "error"}
    assert rows[0]["occupancy"] == 1.0 and rows[0]["ptx_file"].endswith("scale-float32-d64.ptx")


@pytest.mark.parametrize("args, message", [
    (["--cc", "6.1"], "--cc: expected a compute capability X.Y, one of 7.0, 7.5"),
    (["--head-dims", "64,x"], "--head-dims: expected positive integers separated by commas"),
], ids=["cc", "head-dims"])
def test_cli_rejects_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cuda-report", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_without_the_toolchain_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(_cuda_report, "find_ptxas", lambda: None)
    monkeypatch.setattr("numba.config.ENABLE_CUDASIM", False)
    assert main(["cuda-report"]) == 1
    err = capsys.readouterr().err
    assert "ptxas not found" in err and 'pip install "fastattn[cuda-check]"' in err, err


def test_missing_toolchain_asks_for_the_simulator_off(monkeypatch):
    monkeypatch.setattr("numba.config.ENABLE_CUDASIM", True)
    assert "NUMBA_ENABLE_CUDASIM" in _cuda_report.missing_toolchain()


# --- the rules, over the report of every kernel ----------------------------------------------------

@functools.cache
def listed_variants():
    """The variants the rule tests run over (listing them is cheap: nothing compiles), or the error."""
    try:
        return _cuda_report.collect_variants(HEAD_DIMS)
    except Exception as err:  # fails in the tests, not at collection
        return err


def _variant_params(keep=lambda v: True):
    """``(target, index)`` of each variant that a rule applies to, with ids like ``sm90-forward-float16-d64``."""
    if REASON is not None:
        return [pytest.param(None, None, id="no-toolchain")]
    variants = listed_variants()
    if isinstance(variants, Exception):
        return [pytest.param(None, repr(variants), id="variants-failed")]
    return [pytest.param(target, i, id=f"{target}-{_cuda_report.row_id(v)}")
            for target in TARGETS for i, v in enumerate(variants) if keep(v)]


@pytest.fixture(scope="session")
def reports():
    """{target: rows} of every variant at D = 64 and 128, for sm_90 and sm_80 (one NVVM compile each)."""
    if REASON is not None:
        pytest.skip(REASON)
    variants = listed_variants()
    if isinstance(variants, Exception):
        pytest.fail(f"collecting the kernel variants failed: {variants!r}")
    # NVVM compiles on every core, once: the second target reuses the first one's PTX
    return {target: _cuda_report.report(cc, head_dims=HEAD_DIMS, ptx_cc=ptx_cc, jobs=os.cpu_count() or 1)
            for target, (cc, ptx_cc) in TARGETS.items()}


def row_of(reports, target, index, compiled=True):
    if target is None:
        pytest.fail(f"collecting the kernel variants failed: {index}")
    row = reports[target][index]
    if compiled and not row["compiles"]:
        pytest.skip("does not compile: test_every_kernel_compiles fails for it")
    return row


def describe(row):
    return f"{_cuda_report.row_id(row)} ({row['role']}, {row['block_threads']} threads): {row}"


@pytest.mark.parametrize("target, index", _variant_params())
def test_every_kernel_compiles(reports, target, index):
    row = row_of(reports, target, index, compiled=False)
    assert row["compiles"], f"{describe(row)}\n{row['error']}"


@pytest.mark.parametrize("target, index", _variant_params(lambda v: v.dtype != "float64"))
def test_no_float64_instructions_outside_float64_kernels(reports, target, index):
    row = row_of(reports, target, index)
    assert row["f64_ops"] == 0, f"{row['f64_ops']} float64 instructions in {describe(row)}"


@pytest.mark.parametrize("target, index", _variant_params())
def test_no_register_spills(reports, target, index):
    row = row_of(reports, target, index)
    assert row["spill_bytes"] == 0, f"{row['spill_bytes']} bytes spilled in {describe(row)}"


@pytest.mark.parametrize("target, index", _variant_params(lambda v: v.role in ("forward", "decode")))
def test_no_stack_frame_in_forward_and_decode(reports, target, index):
    row = row_of(reports, target, index)
    assert row["stack_frame"] == 0, f"{row['stack_frame']} bytes of stack frame in {describe(row)}"


@pytest.mark.parametrize("target, index", _variant_params())
def test_static_shared_memory_at_most_48_kib(reports, target, index):
    row = row_of(reports, target, index)
    assert row["smem_static"] <= 48 * 1024, f"{row['smem_static']} bytes of static smem in {describe(row)}"


@pytest.mark.parametrize("target, index", _variant_params(lambda v: v.role in MIN_OCCUPANCY))
def test_forward_and_decode_occupancy(reports, target, index):
    row = row_of(reports, target, index)
    least = MIN_OCCUPANCY[row["role"]]
    assert row["occupancy"] >= least, (
        f"occupancy {row['occupancy']:.1%} < {least:.0%} with {row['registers']} registers in {describe(row)}")


@pytest.mark.parametrize("target, index", _variant_params(lambda v: v.kernel.endswith("-mma")))
def test_tensor_core_kernels_run_mma_instructions(reports, target, index):
    row = row_of(reports, target, index)
    assert row["mma_ops"] > 0, f"no mma instruction in {describe(row)}"


@pytest.mark.parametrize("target", list(TARGETS))
def test_tensor_core_kernels_cover_float16_and_bfloat16(reports, target):
    have = {(r["kernel"], r["dtype"], r["head_dim"]) for r in reports[target] if r["kernel"].endswith("-mma")}
    assert have == {(kernel, dtype, d) for kernel in ("forward-mma", "dq-mma", "dkdv-mma", "prefill-mma")
                    for dtype in ("float16", "bfloat16") for d in HEAD_DIMS}, have


@pytest.mark.parametrize("target", list(TARGETS))
def test_tensor_core_helpers_inline_when_linked(reports, target):
    """The CUDA C++ helpers (fastattn/cuda/_mma.cu) are linked with LTO and inline: the linked PTX of every
    tensor-core kernel calls no function and has no local memory, and its B fragments come by ldmatrix."""
    ptx_cc = TARGETS[target][1]
    variants = [v for v in _cuda_report.collect_variants(HEAD_DIMS) if v.kernel.endswith("-mma")]
    assert variants and all(v.link == (_mma.SOURCE,) for v in variants)
    for variant in variants:
        ptx = _cuda_report.compile_variant(variant, ptx_cc)
        opcodes = list(_ptxas._opcodes(ptx))
        where = _cuda_report.row_id(variant)
        assert not [op for op in opcodes if op.startswith("call")], f"a call left in {where}"
        assert ".local" not in ptx, f"local memory in {where}"
        assert any(op.startswith("ldmatrix") for op in opcodes), f"no ldmatrix in {where}"


def test_no_tensor_core_kernels_below_sm80():
    """A report for sm_75 leaves the mma kernels out (they need sm_80) instead of failing them."""
    if REASON is not None:
        pytest.skip(REASON)
    variants = [v for v in _cuda_report.collect_variants((64,)) if v.kernel == "forward-mma"
                or (v.kernel == "forward" and v.dtype == "float16")]
    rows = _cuda_report.report((7, 5), variants=variants)
    assert [r["kernel"] for r in rows] == ["forward"] and rows[0]["compiles"], rows


@pytest.mark.parametrize("target", list(TARGETS))
def test_report_covers_every_dtype(reports, target):
    """Forward and backward kernels in the four float dtypes, paged kernels in both fp8 formats.

    This is also what fails while no module lists its variants: an empty report
    has nothing to hold to the rules above.
    """
    rows = reports[target]
    have = {(r["role"], r["dtype"]) for r in rows}
    missing = [(role, dtype) for role in ("forward", "backward") for dtype in FLOATS if (role, dtype) not in have]
    assert not missing, f"no report rows for (role, dtype) {missing}; rows: {[_cuda_report.row_id(r) for r in rows]}"
    import fastattn.cuda.paged as paged

    variants = getattr(paged, "variants", None)
    assert variants is not None, "fastattn.cuda.paged has no variants(head_dims=None)"
    paged_rows = {(v.kernel, v.dtype, v.head_dim) for v in variants(head_dims=HEAD_DIMS)}
    assert {r[1] for r in paged_rows} >= set(FP8), f"paged variants: no rows for {set(FP8)}: {sorted(paged_rows)}"
    assert paged_rows <= {(r["kernel"], r["dtype"], r["head_dim"]) for r in rows}


@pytest.mark.parametrize("target", list(TARGETS))
def test_report_rows_follow_the_variants(reports, target):
    """The rows that the rule tests index are the listed variants, in order."""
    assert [_cuda_report.row_id(r) for r in reports[target]] == [_cuda_report.row_id(v) for v in listed_variants()]
