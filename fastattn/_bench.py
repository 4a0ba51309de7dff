"""Named benchmark cases shared by ``python -m fastattn bench`` and ``asv_benches/``.

One table of :class:`Case` drives both, as numbagg's comparison table does:
the CLI prints it once with GFLOP/s, the fraction of this machine's measured
sgemm rate and the speed-up over a plain-NumPy peer; asv measures the same
cases over time.  FLOP counts follow FlashAttention's convention: a forward is
``4 * B * Hq * Sq * Sk * D`` (two GEMMs), halved for causal; a backward counts
2.5 forwards (five GEMMs) and forward+backward 3.5.
"""
import json
import sys
import time
from dataclasses import asdict, dataclass

import ml_dtypes
import numpy as np

import fastattn
from fastattn.reference import naive_attention, visible_mask

DTYPES = ("float32", "float16", "bfloat16")
_FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
_KERNELS = {"forward": ("forward",), "backward": ("forward", "backward"),
            "forward+backward": ("forward", "backward")}

#: Sizes of the CLI table: sequence length, heads, head dim, repeats and time budgets.
SIZES = {
    "full": dict(seq=2048, heads=8, head_dim=64, repeats=10, peer_repeats=3, budget_s=10.0, sgemm=2048),
    "quick": dict(seq=1024, heads=8, head_dim=64, repeats=5, peer_repeats=2, budget_s=2.0, sgemm=1024),
    "tiny": dict(seq=128, heads=4, head_dim=32, repeats=2, peer_repeats=1, budget_s=0.5, sgemm=256),
}
#: Sequence lengths of the asv grid (B=1, H=8, D=64); dtypes are :data:`DTYPES`.
ASV_SEQ_LENS = (512, 2048)
#: The long single-head forward whose peak memory must stay linear in N.
LONG_SEQ = 16384
#: Sequence lengths of the float32 forward sweep (B=1, H=8, D=64) that ``docs/plot_bench.py`` draws.
SWEEP_SEQ_LENS = {"full": (256, 512, 1024, 2048), "quick": (256, 512, 1024), "tiny": (64, 128)}


@dataclass(frozen=True)
class Case:
    """One benchmark: an operation on inputs ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``."""

    op: str                 #: "forward", "backward" or "forward+backward"
    dtype: str = "float32"
    seq: int = 2048
    causal: bool = False
    heads_q: int = 8
    heads_kv: int = 8
    batch: int = 1
    head_dim: int = 64

    @property
    def label(self):
        return self.op + (" causal" if self.causal else "")

    @property
    def shape(self):
        return f"{self.batch}×{self.heads_q}×{self.heads_kv}×{self.seq}×{self.head_dim}"

    @property
    def flops(self):
        forward = 4.0 * self.batch * self.heads_q * self.seq * self.seq * self.head_dim
        return forward * (0.5 if self.causal else 1.0) * _FLOP_FACTOR[self.op]


def table(seq=2048, heads=8, head_dim=64):
    """The cases of the CLI table, in print order."""
    base = dict(seq=seq, heads_q=heads, heads_kv=heads, head_dim=head_dim)
    return [
        Case("forward", **base),
        Case("forward", causal=True, **base),
        Case("backward", causal=True, **base),
        Case("forward+backward", causal=True, **base),
        Case("forward", dtype="float16", **base),
        Case("forward", dtype="bfloat16", **base),
        Case("forward", **{**base, "heads_kv": max(1, heads // 4)}),
    ]


def numpy_dtype(name):
    """The dtype of a case's name: NumPy's, or ml_dtypes' bfloat16 / fp8 formats."""
    return np.dtype(getattr(ml_dtypes, name) if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else name)


# --- inputs and the two things being timed ---------------------------------

def make_inputs(case, backend="cpu", seed=0):
    """Random inputs of a case as a dict (q, k, v; dout, out, lse for backward ops).

    ``backend="cuda"`` returns device arrays (out and lse from the CUDA forward).
    The host copies are always under ``"host"`` for the NumPy peer.
    """
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    qshape = (case.batch, case.heads_q, case.seq, case.head_dim)
    kvshape = (case.batch, case.heads_kv, case.seq, case.head_dim)
    host = {name: rng.standard_normal(shape, np.float32).astype(dtype)
            for name, shape in (("q", qshape), ("k", kvshape), ("v", kvshape), ("dout", qshape))}
    if case.op == "forward":
        del host["dout"]
    x = {name: to_device(a) for name, a in host.items()} if backend == "cuda" else dict(host)
    if case.op == "backward":
        x["out"], x["lse"] = fastattn.attention(x["q"], x["k"], x["v"], causal=case.causal, return_lse=True)
        host["out"] = x["out"].copy_to_host() if backend == "cuda" else x["out"]
    x["host"] = host
    return x


def to_device(a):
    """Copy a host array to the GPU; float16/bfloat16 travel as their uint16 bits."""
    from numba import cuda

    bits = fastattn._dtypes.bits_view(np.ascontiguousarray(a))
    dev = cuda.to_device(bits)
    return dev if bits.dtype == a.dtype else dev.view(a.dtype)


def kernel(case, x):
    """A zero-argument callable that runs fastattn on the inputs of a case."""
    q, k, v, causal = x["q"], x["k"], x["v"], case.causal
    if case.op == "forward":
        return lambda: fastattn.attention(q, k, v, causal=causal)
    if case.op == "backward":
        return lambda: fastattn.attention_backward(x["dout"], q, k, v, x["out"], x["lse"], causal=causal)

    def forward_backward():
        out, lse = fastattn.attention(q, k, v, causal=causal, return_lse=True)
        return fastattn.attention_backward(x["dout"], q, k, v, out, lse, causal=causal)
    return forward_backward


def peer_dtype(dtype):
    """What the NumPy peer computes in: float32 for float16 and bfloat16 inputs (NumPy has no BLAS for
    float16 and no bfloat16 arithmetic, so a NumPy user converts), else the inputs' own dtype."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.name in ("float16", "bfloat16") else dtype


def as_peer(*arrays):
    """The arrays converted to :func:`peer_dtype` (no copy when they already are)."""
    return [a.astype(peer_dtype(a.dtype), copy=False) for a in arrays]


def peer(case, x):
    """A zero-argument callable that runs the plain-NumPy peer on the host inputs.

    Half formats are converted to float32 inside the timed call and the results back
    (:func:`peer_dtype`); with ``Hkv < Hq`` the peer repeats K and V to ``Hq`` heads.
    """
    h, causal = x["host"], case.causal
    dtype = h["q"].dtype

    def back(*arrays):
        return [a.astype(dtype, copy=False) for a in arrays]

    if case.op == "forward":
        return lambda: back(naive_attention(*as_peer(h["q"], h["k"], h["v"]), causal=causal))[0]
    if case.op == "backward":
        return lambda: back(*naive_attention_backward(*as_peer(h["dout"], h["q"], h["k"], h["v"], h["out"]),
                                                      causal=causal))
    return lambda: back(*naive_forward_backward(*as_peer(h["dout"], h["q"], h["k"], h["v"]), causal=causal))


# --- the plain-NumPy backward peer ------------------------------------------

def _naive_probs(q, k, causal, scale):
    """Full softmax matrix [B, Hq, Sq, Sk] in the inputs' precision (K repeated for GQA)."""
    kk = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    s = (q @ kk.swapaxes(-1, -2)) * q.dtype.type(scale)
    if causal:
        s = np.where(visible_mask(q.shape[2], k.shape[2], causal=True), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _naive_grads(dout, q, k, v, out, p, scale):
    b, hkv, sk, d = k.shape
    group = q.shape[1] // hkv
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    dv = p.swapaxes(-1, -2) @ dout
    dp = dout @ vv.swapaxes(-1, -2)
    ds = p * (dp - (dout * out).sum(axis=-1, keepdims=True)) * q.dtype.type(scale)
    dq = ds @ kk
    dk = ds.swapaxes(-1, -2) @ q
    return dq, dk.reshape(b, hkv, group, sk, d).sum(axis=2), dv.reshape(b, hkv, group, sk, d).sum(axis=2)


def naive_attention_backward(dout, q, k, v, out, *, causal=False, scale=None):
    """Plain NumPy (dq, dk, dv) with full ``Sq x Sk`` matrices: the backward speed peer."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    return _naive_grads(dout, q, k, v, out, _naive_probs(q, k, causal, scale), scale)


def naive_forward_backward(dout, q, k, v, *, causal=False, scale=None):
    """Plain NumPy forward then backward, keeping the probabilities in between."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    p = _naive_probs(q, k, causal, scale)
    out = p @ np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    return _naive_grads(dout, q, k, v, out, p, scale)


# --- timing ------------------------------------------------------------------

def best_time(fn, repeats, budget_s=float("inf"), sync=None):
    """Best wall time of up to ``repeats`` calls, stopping early once ``budget_s`` is spent."""
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def sgemm_gflops(n, repeats=5):
    """This machine's float32 GEMM rate through NumPy's BLAS (all its threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    a @ b
    return 2.0 * n ** 3 / best_time(lambda: a @ b, repeats) / 1e9


def cuda_status():
    """(usable, reason): CUDA rows need a real GPU; the simulator's timings mean nothing."""
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        return False, "CUDA rows skipped: the CUDA simulator is enabled (timings would be meaningless)"
    try:
        if cuda.is_available():
            return True, ""
    except Exception:
        pass
    return False, "CUDA rows skipped: no CUDA GPU found"


def cuda_sync():
    from numba import cuda

    cuda.synchronize()


class CUDAOnly:
    """asv mixin: the same benchmark on device arrays; skipped (NotImplementedError in setup)
    unless a real GPU is present."""

    backend = "cuda"

    def setup(self, *params):
        usable, reason = cuda_status()
        if not usable:
            raise NotImplementedError(reason)
        super().setup(*params)


def _say(stream, text, end=""):
    stream.write(text + end)
    stream.flush()


def measure(case, backend, settings, warm, peer_ms, sgemm, stream):
    """Time one case on one backend and return its table row (a dict).

    ``first_call_s`` is the first call's time, inputs included: the compile time of the
    kernels in ``new_kernels`` (those this process had not called yet) with an empty
    cache, the time to load them with a warm one.
    """
    sync = cuda_sync if backend == "cuda" else None
    _say(stream, f"  {case.label} {backend} {case.dtype} {case.shape}:")
    new = [name for name in _KERNELS[case.op] if (backend, name, case.dtype) not in warm]
    t0 = time.perf_counter()
    if new:
        _say(stream, f" compiling {' and '.join(new)} kernel{'s' if len(new) > 1 else ''}…")
    x = make_inputs(case, backend)  # a backward's inputs come from the forward kernel
    run = kernel(case, x)
    run()
    if sync:
        sync()
    first_call_s = time.perf_counter() - t0
    if new:
        warm.update((backend, name, case.dtype) for name in new)
        _say(stream, f" {first_call_s:.1f} s;")
    seconds = best_time(run, settings["repeats"], settings["budget_s"], sync)
    _say(stream, f" {seconds * 1e3:.1f} ms;")
    if case not in peer_ms:
        _say(stream, " numpy peer…")
        peer_ms[case] = 1e3 * best_time(peer(case, x), settings["peer_repeats"], settings["budget_s"])
        _say(stream, f" {peer_ms[case]:.1f} ms")
    _say(stream, "", end="\n")
    gflops = case.flops / seconds / 1e9
    return dict(name=case.label, op=case.op, causal=case.causal, backend=backend, dtype=case.dtype,
                shape=case.shape, case=asdict(case), time_ms=seconds * 1e3, gflops=gflops,
                pct_sgemm=100.0 * gflops / sgemm if backend == "cpu" else None,
                peer_ms=peer_ms[case], speedup=peer_ms[case] / (seconds * 1e3),
                first_call_s=first_call_s, new_kernels=new)


def format_table(rows):
    """The rows as an aligned plain-text table."""
    head = ("op", "backend", "dtype", "shape (B×Hq×Hkv×N×D)", "time ms", "GFLOP/s", "% sgemm", "vs NumPy")
    body = [(r["name"], r["backend"], r["dtype"], r["shape"], f"{r['time_ms']:.2f}", f"{r['gflops']:.1f}",
             "—" if r["pct_sgemm"] is None else f"{r['pct_sgemm']:.0f}%", f"{r['speedup']:.1f}×")
            for r in rows]
    widths = [max(len(row[c]) for row in (head, *body)) for c in range(len(head))]
    right = {4, 5, 6, 7}

    def line(row):
        return "  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                         for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *map(line, body)])


def sweep_cases(size="full"):
    """The forward cases of the sequence-length sweep: float32, non-causal and causal, per length."""
    return [Case("forward", seq=seq, causal=causal) for seq in SWEEP_SEQ_LENS[size] for causal in (False, True)]


def sweep(size, stream):
    """Time fastattn's CPU forward and its NumPy peer in turn over :func:`sweep_cases`; return the points.

    Each point is ``{"op", "seq", "fastattn_s", "numpy_s"}`` (best seconds of
    ``repeats`` calls of each, the two called alternately so that a busy
    machine slows both alike).
    """
    from ._bench_projection import interleaved

    repeats = SIZES[size]["repeats"]
    _say(stream, f"sequence-length sweep (forward float32, B=1, H=8, D=64, best of {repeats} in turn):", end="\n")
    points = []
    for case in sweep_cases(size):
        x = make_inputs(case)
        ours, naive = kernel(case, x), peer(case, x)
        ours()  # compile (or load the cache) and warm up
        naive()
        fastattn_s, numpy_s = interleaved([ours, naive], repeats)
        points.append(dict(op=case.label, seq=case.seq, fastattn_s=fastattn_s, numpy_s=numpy_s))
        _say(stream, f"  {case.label:<15} N={case.seq:<5} fastattn {fastattn_s * 1e3:8.2f} ms  "
                     f"numpy {numpy_s * 1e3:8.2f} ms  {numpy_s / fastattn_s:5.1f}×", end="\n")
    return points


def run(size="full", backends=("cpu", "cuda"), json_path=None, stream=None, peers=False):
    """Measure sgemm, the CPU tables, then the GPU section; print and return the CPU rows.

    ``peers=True`` adds the PyTorch section (:mod:`fastattn._bench_torch`) after the
    CPU tables, kept under ``"torch"`` in the JSON report.

    The GPU section (:mod:`fastattn._bench_cuda`) runs only on a real GPU;
    otherwise a note says why it was skipped.  The JSON report holds it under
    ``"gpu"`` whenever the cuda backend was asked for.
    """
    from . import _bench_paged, _bench_projection, _info

    stream = sys.stdout if stream is None else stream

    settings = SIZES[size]
    threads = _info.threading()
    cpu = _info.cpu()
    _say(stream, f"fastattn {fastattn.__version__} on {cpu['model']} ({cpu['cores']} cores), "
                 f"numba {threads['threads']} threads ({threads['threading_layer']} layer)", end="\n")
    for line in _info.blas():
        _say(stream, f"BLAS: {line}", end="\n")
    n = settings["sgemm"]
    _say(stream, f"measuring sgemm (NumPy float32 matmul {n}×{n})…")
    sgemm = sgemm_gflops(n)
    _say(stream, f" {sgemm:.1f} GFLOP/s", end="\n")

    cases = table(settings["seq"], settings["heads"], settings["head_dim"])
    rows, notes, warm, peer_ms = [], [], set(), {}
    gpu = None
    for backend in backends:
        if backend == "cuda":
            # a real GPU gets its own section (below); the CPU's NumPy peer means nothing beside it
            usable, reason = cuda_status()
            gpu = dict(skipped=reason) if not usable else None
            if not usable:
                notes.append(reason)
            continue
        _say(stream, f"{backend} (compiling happens once per kernel and dtype; later runs load the cache):",
             end="\n")
        for case in cases:
            rows.append(measure(case, backend, settings, warm, peer_ms, sgemm, stream))

    if rows:
        _say(stream, "", end="\n")
        _say(stream, format_table(rows), end="\n")
        _say(stream, f"% sgemm: of the {sgemm:.1f} GFLOP/s measured above; vs NumPy: time of "
                     "fastattn.reference.naive_attention (or the NumPy backward peer) / time of fastattn; "
                     "the peer computes float16/bfloat16 in float32 (converting in the timed call) and "
                     "repeats K/V to Hq heads for GQA (np.repeat)", end="\n")
    if any((r["pct_sgemm"] or 0) > 100 for r in rows):
        notes.append("a row beats the measured sgemm rate: the machine was probably busy while sgemm "
                     "ran; rerun on an idle machine")
    for note in notes:
        _say(stream, note, end="\n")
    points = []
    if "cpu" in backends:
        _say(stream, "", end="\n")
        points = sweep(size, stream)
    paged_rows, bandwidth, paged_ratios, projection_rows = [], None, {}, []
    if "cpu" in backends:
        _say(stream, "", end="\n")
        paged_rows, bandwidth, paged_ratios = _bench_paged.run(size, stream, ["cpu"])
        _say(stream, "", end="\n")
        projection_rows = _bench_projection.run(size, stream)
    torch_section = None
    if peers and "cpu" in backends:
        from . import _bench_torch

        _say(stream, "", end="\n")
        torch_section = _bench_torch.run(size, stream)
    if "cuda" in backends and gpu is None:
        from . import _bench_cuda

        _say(stream, "", end="\n")
        gpu = _bench_cuda.run(size, stream)
    if json_path:
        report = dict(size=size, settings=settings, sgemm_gflops=sgemm, rows=rows, notes=notes,
                      read_bandwidth_gbs=bandwidth, paged_rows=paged_rows, paged_ratios=paged_ratios,
                      projection_rows=projection_rows, sweep=points,
                      machine=_info.machine_info())
        if "cuda" in backends:
            report["gpu"] = gpu
        if peers:
            report["torch"] = torch_section
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        _say(stream, f"wrote {json_path}", end="\n")
    return rows
