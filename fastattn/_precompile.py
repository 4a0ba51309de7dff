"""``python -m fastattn precompile``: fill numba's cache with the CPU kernels, once.

Every CPU kernel is compiled on its first call for each dtype (``cache=True``
keeps the result on disk), which costs seconds per kernel.  This command calls
each operation once on tiny inputs in each requested dtype, so that a Docker
image, a CI job or a fresh environment pays that cost up front, and says how
long each operation took.  Operations run in ``jobs`` processes; each operation
stays in one process, so no two processes write the same cache index.
"""
import sys
import time

import numpy as np

#: Operation groups, in the order they run.
OPS = ("attention", "paged", "paged_fp8", "gqa", "projection", "layer")
#: Input dtypes (fp8 caches come with ``paged_fp8``, queries in float32 or float16).
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _attention(dtype, rng):
    from . import attention, attention_backward

    q, k, v, dout = (rng.standard_normal((1, 2, s, 16)).astype(dtype) for s in (3, 5, 5, 3))
    for causal in (False, True):
        out, lse = attention(q, k, v, causal=causal, return_lse=True)
        attention_backward(dout, q, k, v, out, lse, causal=causal)
    attention(q[:, :, :1], k, v)  # a decode step


def _paged_inputs(dtype, rng, q_heads=4, seq_q=1):
    q = rng.standard_normal((2, q_heads, seq_q, 16)).astype(dtype)
    k_cache, v_cache = (rng.standard_normal((4, 4, 2, 16)).astype(dtype) for _ in range(2))
    return q, k_cache, v_cache, np.array([[0, 1], [2, 3]], np.int32), np.array([7, 8], np.int32)


def _paged(dtype, rng):
    from . import paged_attention, paged_attention_backward, write_kv_cache

    for seq_q in (1, 3):
        q, k_cache, v_cache, table, lens = _paged_inputs(dtype, rng, seq_q=seq_q)
        out, lse = paged_attention(q, k_cache, v_cache, table, lens, causal=True, return_lse=True)
        if seq_q > 1:
            paged_attention_backward(q, q, k_cache, v_cache, out, lse, table, lens, causal=True)
    k = rng.standard_normal((3, 2, 16)).astype(dtype)
    write_kv_cache(k, k, k_cache, v_cache, np.array([0, 5, 9]))


def _paged_fp8(dtype, rng):
    if dtype == np.float64:  # fp8 attention takes float32, float16 or bfloat16 queries
        return
    import ml_dtypes

    from . import paged_attention_fp8, write_kv_cache

    for fmt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        q, k_cache, v_cache, table, lens = _paged_inputs(dtype, rng)
        k_cache, v_cache = k_cache.astype(fmt), v_cache.astype(fmt)
        paged_attention_fp8(q, k_cache, v_cache, table, lens)
        k = rng.standard_normal((3, 2, 16)).astype(dtype)
        write_kv_cache(k, k, k_cache, v_cache, np.array([0, 5, 9]))


def _gqa(dtype, rng):
    from . import repeat_kv, repeat_kv_backward

    kv = rng.standard_normal((1, 2, 5, 16)).astype(dtype)
    repeat_kv_backward(repeat_kv(kv, 2), 2)


def _projection(dtype, rng):
    from . import (fused_output_projection_residual, fused_output_projection_residual_backward,
                   fused_qkv_projection, fused_qkv_projection_backward)

    x = rng.standard_normal((1, 3, 32)).astype(dtype)
    weight = rng.standard_normal(((4 + 2 * 2) * 8, 32)).astype(dtype)
    bias = rng.standard_normal(weight.shape[0]).astype(dtype)
    q, k, v = fused_qkv_projection(x, weight, bias, num_heads=4, num_kv_heads=2, head_dim=8)
    fused_qkv_projection_backward(q, k, v, x, weight, has_bias=True)
    w_out = rng.standard_normal((32, 32)).astype(dtype)
    fused_output_projection_residual(x, w_out, bias[:32], x)
    fused_output_projection_residual_backward(x, x, w_out, has_bias=True)


def _layer(dtype, rng):
    from . import MultiheadAttention

    layer = MultiheadAttention(32, 4, num_kv_heads=2, dtype=dtype, seed=0)
    x = rng.standard_normal((1, 3, 32)).astype(dtype)
    y = layer.forward(x, causal=True)
    layer.backward(np.ones_like(y))


_RUN = {"attention": _attention, "paged": _paged, "paged_fp8": _paged_fp8, "gqa": _gqa,
        "projection": _projection, "layer": _layer}


def run_one(op, dtypes):
    """Call operation group ``op`` in each dtype; return ``[(op, dtype name, seconds)]``."""
    from ._dtypes import dtype_named

    rng = np.random.default_rng(0)
    done = []
    for name in dtypes:
        start = time.perf_counter()
        _RUN[op](dtype_named(name), rng)
        done.append((op, name, time.perf_counter() - start))
    return done


def precompile(ops=OPS, dtypes=DTYPES, jobs=1, out=None):
    """Compile (or load from the cache) every CPU kernel of ``ops`` in ``dtypes``.

    Parameters
    ----------
    ops : sequence of str
        Operation groups from :data:`OPS`.
    dtypes : sequence of str
        Input dtype names from :data:`DTYPES`.
    jobs : int
        Processes to spread the operation groups over.
    out : file, optional
        Where the progress lines go (default: ``sys.stdout`` at the call).

    Returns
    -------
    list of (str, str, float)
        ``(op, dtype, seconds)`` of each call, in completion order.

    Examples
    --------
    >>> import io
    >>> rows = precompile(["gqa"], ["float32"], out=io.StringIO())
    >>> [(op, dtype) for op, dtype, _ in rows]
    [('gqa', 'float32')]
    """
    out = sys.stdout if out is None else out
    bad = [o for o in ops if o not in OPS] + [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"precompile: expected ops from {OPS} and dtypes from {DTYPES}, got {bad}")
    start = time.perf_counter()
    rows = []

    def report(part):
        for op, name, seconds in part:
            rows.append((op, name, seconds))
            print(f"  [{len(rows)}/{len(ops) * len(dtypes)}] {op:<11} {name:<9} {seconds:6.1f} s", file=out,
                  flush=True)

    if jobs > 1 and len(ops) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(jobs, len(ops)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(run_one, op, tuple(dtypes)) for op in ops]):
                report(future.result())
    else:
        for op in ops:
            report(run_one(op, dtypes))
    print(f"precompiled {len(rows)} operation groups in {time.perf_counter() - start:.1f} s", file=out)
    return rows
