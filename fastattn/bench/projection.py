"""Named projection and layer benchmark cases shared by ``python -m fastattn bench`` and ``asv_benches/``.

A fused projection is one GEMM with its epilogue, so it is compared with the
bare ``x @ weight.T`` of the same shape (the best it can do) and with the
unfused NumPy path it replaces (matmul, bias, split, reshape, transpose,
copy).  The layer's forward+backward is compared with the sum of its parts
timed one by one.  Timings of a case and its peers are interleaved, so that a
busy machine slows them alike.
"""
from dataclasses import asdict, dataclass

import numpy as np

import fastattn

from .core import align, interleaved, numpy_dtype

#: Shapes of the CLI table: the issue's B=4, S=512, H=1024, 16 query heads, 4 KV heads, D=64.
SIZES = {
    "full": dict(batch=4, seq=512, hidden=1024, heads_q=16, heads_kv=4, head_dim=64, repeats=10),
    "quick": dict(batch=2, seq=512, hidden=1024, heads_q=16, heads_kv=4, head_dim=64, repeats=5),
    "tiny": dict(batch=2, seq=32, hidden=64, heads_q=4, heads_kv=2, head_dim=16, repeats=2),
}


@dataclass(frozen=True)
class ProjectionCase:
    op: str                 #: "qkv", "output", "qkv backward", "output backward" or "layer"
    dtype: str = "float32"
    batch: int = 4
    seq: int = 512
    hidden: int = 1024
    heads_q: int = 16
    heads_kv: int = 4
    head_dim: int = 64

    @property
    def shape(self):
        return (f"B={self.batch} S={self.seq} H={self.hidden} heads={self.heads_q}/{self.heads_kv} "
                f"D={self.head_dim}")

    @property
    def n_qkv(self):
        return (self.heads_q + 2 * self.heads_kv) * self.head_dim

    @property
    def flops(self):
        tokens = self.batch * self.seq
        qkv = 2.0 * tokens * self.hidden * self.n_qkv
        out = 2.0 * tokens * self.hidden * self.heads_q * self.head_dim
        if self.op == "qkv":
            return qkv
        if self.op == "output":
            return out
        if self.op.endswith("backward"):  # two GEMMs: the input's gradient and the weight's
            return 2.0 * (qkv if self.op == "qkv backward" else out)
        attention = 4.0 * self.batch * self.heads_q * self.seq * self.seq * self.head_dim / 2  # causal
        return 3.0 * (qkv + out) + 3.5 * attention  # forward + backward (2 GEMMs per projection GEMM)


def table(size="full"):
    s = SIZES[size]
    base = {k: s[k] for k in ("batch", "seq", "hidden", "heads_q", "heads_kv", "head_dim")}
    return [ProjectionCase("qkv", "float32", **base), ProjectionCase("qkv", "bfloat16", **base),
            ProjectionCase("output", "float32", **base), ProjectionCase("qkv backward", "float32", **base),
            ProjectionCase("output backward", "float32", **base), ProjectionCase("layer", "float32", **base)]


def make_inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape, np.float32) * scale).astype(dtype)
    p = case.heads_q * case.head_dim
    x = dict(x=normal(case.batch, case.seq, case.hidden),
             weight=normal(case.n_qkv, case.hidden, scale=case.hidden ** -0.5), bias=normal(case.n_qkv),
             attn_out=normal(case.batch, case.seq, p), out_weight=normal(case.hidden, p, scale=p ** -0.5),
             out_bias=normal(case.hidden), residual=normal(case.batch, case.seq, case.hidden))
    if case.op == "qkv backward":
        x["dq"] = normal(case.batch, case.heads_q, case.seq, case.head_dim)
        x["dk"], x["dv"] = (normal(case.batch, case.heads_kv, case.seq, case.head_dim) for _ in range(2))
        # the bare GEMMs' operand: the same gradient as one [B*S, N] matrix
        x["dy_qkv"] = np.ascontiguousarray(np.concatenate(
            [x[n].transpose(0, 2, 1, 3).reshape(case.batch * case.seq, -1) for n in ("dq", "dk", "dv")], axis=1))
    if case.op == "output backward":
        x["dout"] = normal(case.batch, case.seq, case.hidden)
    if case.op == "layer":
        x["layer"] = fastattn.MultiheadAttention(case.hidden, case.heads_q, case.heads_kv, dtype=dtype, seed=seed)
        x["dout"] = normal(case.batch, case.seq, case.hidden)
    return x


def kernel(case, x):
    """A zero-argument callable running fastattn on a case."""
    heads = dict(num_heads=case.heads_q, num_kv_heads=case.heads_kv, head_dim=case.head_dim)
    if case.op == "qkv":
        return lambda: fastattn.fused_qkv_projection(x["x"], x["weight"], x["bias"], **heads)
    if case.op == "output":
        return lambda: fastattn.fused_output_projection_residual(x["attn_out"], x["out_weight"], x["out_bias"],
                                                                 x["residual"])
    if case.op == "qkv backward":
        return lambda: fastattn.fused_qkv_projection_backward(x["dq"], x["dk"], x["dv"], x["x"], x["weight"],
                                                              has_bias=True)
    if case.op == "output backward":
        return lambda: fastattn.fused_output_projection_residual_backward(x["dout"], x["attn_out"],
                                                                          x["out_weight"], has_bias=True)

    def forward_backward():
        x["layer"].forward(x["x"], causal=True)
        return x["layer"].backward(x["dout"])
    return forward_backward


def bare(case, x):
    """The bare NumPy matmuls of the same shapes (a backward: its two GEMMs; for the layer: None)."""
    tokens = case.batch * case.seq
    if case.op == "qkv":
        return lambda: x["x"] @ x["weight"].T
    if case.op == "output":
        return lambda: x["attn_out"] @ x["out_weight"].T
    if case.op.endswith("backward"):
        if case.op == "qkv backward":
            dy, w, inp = x["dy_qkv"], x["weight"], x["x"].reshape(tokens, -1)
        else:
            dy, w, inp = x["dout"].reshape(tokens, -1), x["out_weight"], x["attn_out"].reshape(tokens, -1)
        return lambda: (dy @ w, dy.T @ inp)
    return None


def unfused(case, x):
    """The plain NumPy path the fused op replaces (for the layer: the sum of fastattn's parts)."""
    b, s, d = case.batch, case.seq, case.head_dim
    if case.op == "qkv":
        def qkv():
            y = x["x"] @ x["weight"].T + x["bias"]
            parts = np.split(y, [case.heads_q * d, (case.heads_q + case.heads_kv) * d], axis=-1)
            return [np.ascontiguousarray(t.reshape(b, s, -1, d).transpose(0, 2, 1, 3)) for t in parts]
        return qkv
    if case.op == "output":
        return lambda: x["attn_out"] @ x["out_weight"].T + x["out_bias"] + x["residual"]
    if case.op == "qkv backward":
        def qkv_backward():
            dy = np.concatenate([x[n].transpose(0, 2, 1, 3).reshape(b * s, -1) for n in ("dq", "dk", "dv")], axis=1)
            inp = x["x"].reshape(b * s, -1)
            return (dy @ x["weight"]).reshape(x["x"].shape), dy.T @ inp, dy.sum(axis=0)
        return qkv_backward
    if case.op == "output backward":
        def output_backward():
            dy = x["dout"].reshape(b * s, -1)
            dattn = (dy @ x["out_weight"]).reshape(x["attn_out"].shape)
            return dattn, dy.T @ x["attn_out"].reshape(b * s, -1), dy.sum(axis=0), x["dout"].copy()
        return output_backward
    return None


def layer_parts(case, x):
    """The layer's steps as separate public calls, with their inputs made once (sum of parts)."""
    layer = x["layer"]
    w = layer._qkv_weight
    b = layer._qkv_bias
    heads = dict(num_heads=case.heads_q, num_kv_heads=case.heads_kv, head_dim=case.head_dim)
    q, k, v = fastattn.fused_qkv_projection(x["x"], w, b, **heads)
    out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    attn = np.ascontiguousarray(out.transpose(0, 2, 1, 3)).reshape(case.batch, case.seq, -1)
    wo, bo = layer._out_weight, layer._out_bias
    dattn = fastattn.fused_output_projection_residual_backward(x["dout"], attn, wo, has_bias=True)[0]
    dout_heads = np.ascontiguousarray(dattn.reshape(case.batch, case.seq, case.heads_q, -1).transpose(0, 2, 1, 3))
    dq, dk, dv = fastattn.attention_backward(dout_heads, q, k, v, out, lse, causal=True)
    return {
        "qkv projection": lambda: fastattn.fused_qkv_projection(x["x"], w, b, **heads),
        "attention": lambda: fastattn.attention(q, k, v, causal=True, return_lse=True),
        "output projection": lambda: fastattn.fused_output_projection_residual(attn, wo, bo, None),
        "output backward": lambda: fastattn.fused_output_projection_residual_backward(x["dout"], attn, wo,
                                                                                       has_bias=True),
        "attention backward": lambda: fastattn.attention_backward(dout_heads, q, k, v, out, lse, causal=True),
        "qkv backward": lambda: fastattn.fused_qkv_projection_backward(dq, dk, dv, x["x"], w, has_bias=True),
    }


def measure(case, settings, stream):
    stream.write(f"  {case.op} {case.dtype} {case.shape}:")
    stream.flush()
    x = make_inputs(case)
    run = kernel(case, x)
    run()  # compile (or load the cache) and warm up
    if case.op == "layer":
        parts = layer_parts(case, x)
        for fn in parts.values():
            fn()
        # the layer keeps every GEMM on numba's threads, the public parts use NumPy's BLAS: timed in
        # turn, each would start while the other's threads still spin, so the two are timed apart
        (seconds,) = interleaved([run], settings["repeats"])
        times = [seconds, *interleaved(list(parts.values()), settings["repeats"])]
        peer_s, bare_s = sum(times[1:]), None
        detail = ", ".join(f"{name} {t * 1e3:.1f}" for name, t in zip(parts, times[1:]))
        stream.write(f" {seconds * 1e3:.1f} ms; parts {peer_s * 1e3:.1f} ms ({detail})\n")
    else:
        seconds, bare_s, peer_s = interleaved([run, bare(case, x), unfused(case, x)], settings["repeats"])
        stream.write(f" {seconds * 1e3:.2f} ms; bare matmul {bare_s * 1e3:.2f} ms; unfused NumPy "
                     f"{peer_s * 1e3:.1f} ms\n")
    return dict(op=case.op, dtype=case.dtype, shape=case.shape, case=asdict(case), time_ms=seconds * 1e3,
                gflops=case.flops / seconds / 1e9, bare_ms=None if bare_s is None else bare_s * 1e3,
                vs_bare=None if bare_s is None else seconds / bare_s, peer_ms=peer_s * 1e3,
                speedup=peer_s / seconds)


def format_table(rows):
    head = ("op", "dtype", "shape", "time ms", "GFLOP/s", "÷ bare matmul", "vs unfused / parts")
    body = [(r["op"], r["dtype"], r["shape"], f"{r['time_ms']:.2f}", f"{r['gflops']:.1f}",
             "—" if r["vs_bare"] is None else f"{r['vs_bare']:.2f}", f"{r['speedup']:.2f}×") for r in rows]
    return align(head, body, 3)


def run(size, stream):
    settings = SIZES[size]
    stream.write("projections and the attention layer (cpu; each timed in turn with its peers):\n")
    rows = [measure(case, settings, stream) for case in table(size)]
    stream.write("\n" + format_table(rows) + "\n")
    stream.write("÷ bare matmul: time / time of the bare x @ weight.T (a backward: of its two GEMMs, "
                 "dy @ weight and dy.T @ x; 1.00 = the GEMMs alone); vs unfused: "
                 "time of NumPy's matmul + bias + split + transpose + copy / time of fastattn; for the "
                 "layer, forward+backward against the sum of its parts called one by one (the layer and its parts "
                 "timed apart, each part in turn with the others)\n")
    return rows
