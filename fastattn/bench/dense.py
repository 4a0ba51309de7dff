"""Named benchmark cases shared by ``python -m fastattn bench`` and ``asv_benches/``.

One table of :class:`Case` drives both, as numbagg's comparison table does:
the CLI prints it once with GFLOP/s, the fraction of this machine's measured
sgemm rate and the speed-up over a plain-NumPy peer; asv measures the same
cases over time.  FLOP counts follow FlashAttention's convention: a forward is
``4 * B * Hq * Sq * Sk * D`` (two GEMMs), halved for causal; a backward counts
2.5 forwards (five GEMMs) and forward+backward 3.5.
"""
import time
from dataclasses import asdict, dataclass

import numpy as np

import fastattn
from fastattn.reference import naive_attention, visible_mask

from .core import align, as_peer, best_time, cuda_sync, interleaved, numpy_dtype, say, to_device

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


def measure(case, backend, settings, warm, peer_ms, sgemm, stream):
    """Time one case on one backend and return its table row (a dict).

    ``first_call_s`` is the first call's time, inputs included: the compile time of the
    kernels in ``new_kernels`` (those this process had not called yet) with an empty
    cache, the time to load them with a warm one.
    """
    sync = cuda_sync if backend == "cuda" else None
    say(stream, f"  {case.label} {backend} {case.dtype} {case.shape}:")
    new = [name for name in _KERNELS[case.op] if (backend, name, case.dtype) not in warm]
    t0 = time.perf_counter()
    if new:
        say(stream, f" compiling {' and '.join(new)} kernel{'s' if len(new) > 1 else ''}…")
    x = make_inputs(case, backend)  # a backward's inputs come from the forward kernel
    run = kernel(case, x)
    run()
    if sync:
        sync()
    first_call_s = time.perf_counter() - t0
    if new:
        warm.update((backend, name, case.dtype) for name in new)
        say(stream, f" {first_call_s:.1f} s;")
    seconds = best_time(run, settings["repeats"], settings["budget_s"], sync)
    say(stream, f" {seconds * 1e3:.1f} ms;")
    if case not in peer_ms:
        say(stream, " numpy peer…")
        peer_ms[case] = 1e3 * best_time(peer(case, x), settings["peer_repeats"], settings["budget_s"])
        say(stream, f" {peer_ms[case]:.1f} ms")
    say(stream, "", end="\n")
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
    return align(head, body, 4)


#: seconds between the sweep's calls: the peers' BLAS and OpenMP threads spin after a call, and at the
#: short lengths that slowed the next call up to tenfold (N=256: 7.6 ms against 0.6 ms alone)
SWEEP_PAUSE = 0.15


def sweep_cases(size="full"):
    """The forward cases of the sequence-length sweep: float32, non-causal and causal, per length."""
    return [Case("forward", seq=seq, causal=causal) for seq in SWEEP_SEQ_LENS[size] for causal in (False, True)]


def sweep(size, stream, torch_peer=None):
    """Time fastattn's CPU forward and its NumPy peer in turn over :func:`sweep_cases`; return the points.

    Each point is ``{"op", "seq", "flops", "fastattn_s", "numpy_s"}`` (best seconds
    of ``repeats`` calls of each, called alternately so that a busy machine
    slows them alike, :data:`SWEEP_PAUSE` apart); with ``torch_peer(case, host_inputs)``, a builder of
    PyTorch's callable (:func:`fastattn.bench.torch_peers.dense_peer`), it joins
    the turn and the point gets ``"torch_s"``.
    """
    repeats = SIZES[size]["repeats"]
    peers = "NumPy and PyTorch" if torch_peer is not None else "NumPy"
    say(stream, f"sequence-length sweep (forward float32, B=1, H=8, D=64, best of {repeats}, in turn with "
                f"{peers}):", end="\n")
    points = []
    for case in sweep_cases(size):
        x = make_inputs(case)
        fns = [kernel(case, x), peer(case, x)]
        if torch_peer is not None:
            fns.append(torch_peer(case, x["host"]))
        for fn in fns:  # compile (or load the cache) and warm up
            fn()
        times = interleaved(fns, repeats, pause=SWEEP_PAUSE)
        point = dict(op=case.label, seq=case.seq, flops=case.flops, fastattn_s=times[0], numpy_s=times[1])
        text = (f"  {case.label:<15} N={case.seq:<5} fastattn {times[0] * 1e3:8.2f} ms  "
                f"numpy {times[1] * 1e3:8.2f} ms  {times[1] / times[0]:5.1f}×")
        if torch_peer is not None:
            point["torch_s"] = times[2]
            text += f"  torch {times[2] * 1e3:8.2f} ms"
        points.append(point)
        say(stream, text, end="\n")
    return points
