"""Rotary embeddings: alone against NumPy, and fused against the same calls without them.

Each row is timed in turn with its peer (ratios, not absolute times):

- ``rotary`` on q ``[B, Hq, S, D]`` against the NumPy expression a user would
  write (float32, the halves split and recombined with temporaries);
- ``fused_qkv_projection`` and its backward with ``rotary=`` against the same
  call without (the target: within 1.1x);
- the layer's forward+backward with ``rotary_dim = head_dim`` against the layer
  without (the target: within 1.05x).
"""
import numpy as np

import fastattn

from .core import align, interleaved, say

#: Shapes of the CLI table: the projection table's B, S, hidden size and heads.
SIZES = {
    "full": dict(batch=4, seq=512, hidden=1024, heads_q=16, heads_kv=4, head_dim=64, repeats=10),
    "quick": dict(batch=2, seq=512, hidden=1024, heads_q=16, heads_kv=4, head_dim=64, repeats=5),
    "tiny": dict(batch=2, seq=32, hidden=64, heads_q=4, heads_kv=2, head_dim=16, repeats=2),
}


def numpy_rotary(x, cos, sin):
    """RoPE in plain NumPy (GPT-NeoX halves, positions 0..S-1): the peer of :func:`fastattn.rotary`."""
    half = cos.shape[1]
    c, s = cos[:x.shape[2]], sin[:x.shape[2]]
    u, v = x[..., :half], x[..., half:2 * half]
    return np.concatenate([u * c - v * s, v * c + u * s, x[..., 2 * half:]], axis=-1)


def cases(size, seed=0):
    """``[(label, shape, fastattn callable, peer callable, peer name)]`` of the table."""
    p = SIZES[size]
    rng = np.random.default_rng(seed)
    b, s, e, hq, hkv, d = (p[k] for k in ("batch", "seq", "hidden", "heads_q", "heads_kv", "head_dim"))
    cos, sin = fastattn.rotary_tables(d, s)
    q = rng.standard_normal((b, hq, s, d), dtype=np.float32)
    x = rng.standard_normal((b, s, e), dtype=np.float32)
    w = (rng.standard_normal(((hq + 2 * hkv) * d, e)) / np.sqrt(e)).astype(np.float32)
    heads = dict(num_heads=hq, num_kv_heads=hkv, head_dim=d)
    grads = fastattn.fused_qkv_projection(x, w, **heads)
    plain = fastattn.MultiheadAttention(e, hq, hkv, seed=0)
    rope = fastattn.MultiheadAttention(e, hq, hkv, seed=0, rotary_dim=d)
    dout = rng.standard_normal((b, s, e), dtype=np.float32)

    def layer_step(layer):
        def step():
            layer.forward(x, causal=True)
            return layer.backward(dout)
        return step

    shape = f"B={b} S={s} H={e} heads={hq}/{hkv} D={d}"
    return [
        ("rotary (q)", f"{b}×{hq}×{s}×{d}", lambda: fastattn.rotary(q, cos, sin), lambda: numpy_rotary(q, cos, sin),
         "NumPy"),
        ("qkv projection + rotary", shape, lambda: fastattn.fused_qkv_projection(x, w, **heads, rotary=(cos, sin)),
         lambda: fastattn.fused_qkv_projection(x, w, **heads), "without rotary"),
        ("qkv backward + rotary", shape,
         lambda: fastattn.fused_qkv_projection_backward(*grads, x, w, rotary=(cos, sin)),
         lambda: fastattn.fused_qkv_projection_backward(*grads, x, w), "without rotary"),
        ("layer fwd+bwd + rotary", shape, layer_step(rope), layer_step(plain), "without rotary"),
    ]


def run(size, stream):
    """Print the table; return its rows (dicts) for the JSON report."""
    say(stream, "rotary embeddings (float32; each timed in turn with its peer):", end="\n")
    rows = []
    for label, shape, fn, peer, peer_name in cases(size):
        fn(), peer()  # compile and warm
        t, t_peer = interleaved([fn, peer], SIZES[size]["repeats"])
        rows.append(dict(op=label, shape=shape, ms=t * 1e3, peer=peer_name, peer_ms=t_peer * 1e3,
                         ratio=t / t_peer))
    say(stream, align(("op", "shape", "ms", "peer", "peer ms", "÷ peer"),
                      [(r["op"], r["shape"], f"{r['ms']:.2f}", r["peer"], f"{r['peer_ms']:.2f}",
                        f"{r['ratio']:.2f}") for r in rows], 2), end="\n")
    say(stream, "peers: NumPy's RoPE expression (float32, temporaries), or the same fastattn call without "
                "rotary", end="\n")
    return rows
