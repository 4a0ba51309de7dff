"""CUDA kernels of the dense attention family (numba.cuda).

The twin of :mod:`fastattn.cpu.attention`.  Forward: one thread per query row,
``config.cuda_block_q`` rows per block; keys and values are staged through
shared memory ``config.cuda_block_k`` rows at a time and the online softmax
lives in registers.  Backward: a ``delta`` kernel, a dq kernel shaped like the
forward (no atomics: each thread owns its row of dq), and a dk/dv kernel with
one thread per key row that stages query/dout tiles in shared memory and sums
over the query heads of its KV group (native GQA, nothing repeated).
"""
import math

import numpy as np
from numba import cuda, float32, float64

from .._config import config
from .. import _dtypes
from .._dtypes import codec_of, narrow, widen
from .._tile import alibi_bias, finish_lse, key_range, online_rescale, query_range, softcap_grad, softcap_score
from . import _launch

_kernels = {}


def _acc_type(spec):
    return float64 if spec.accum_dtype == np.float64 else float32


def _compiled(name, acc, tile, max_dim):
    key = (name, acc, tile, max_dim)
    if key not in _kernels:
        _kernels[key] = _MAKERS[name](acc, tile, max_dim)
    return _kernels[key]


@cuda.jit(device=True)
def _score(q_row, keys, r, dim, i, j, sq, sk, softcap, slope, has_alibi):
    """(score, softcapped pre-ALiBi score) of query row q_row against staged key r."""
    x = 0.0
    for d in range(dim):
        x += q_row[d] * keys[r, d]
    capped = softcap_score(x, softcap)
    score = capped
    if has_alibi:
        score += alibi_bias(slope, i, j, sq, sk)
    return score, capped


@cuda.jit(device=True)
def _query_rows(heads_q, heads_kv, sq):
    """This block's (batch, head, KV head, first row, last row) and this thread's row."""
    b = cuda.blockIdx.y // heads_q
    h = cuda.blockIdx.y % heads_q
    first = cuda.blockIdx.x * cuda.blockDim.x
    last = min(sq, first + cuda.blockDim.x) - 1
    return b, h, h // (heads_q // heads_kv), first, last, first + cuda.threadIdx.x


@cuda.jit(device=True)
def _stage(src, b, h, j0, n, dim, codec, dst, scale):
    """Cooperatively copy rows j0..j0+n of src[b, h] into shared memory, times scale."""
    for e in range(cuda.threadIdx.x, n * dim, cuda.blockDim.x):
        r = e // dim
        d = e - r * dim
        dst[r, d] = widen(src[b, h, j0 + r, d], codec) * scale


def _make_forward(acc, tile, max_dim):
    @cuda.jit
    def forward(q, k, v, codec, scale, wl, wr, shift, softcap, slopes, has_alibi, out, lse):
        batch, heads_q, sq, dim = q.shape
        heads_kv, sk = k.shape[1], k.shape[2]
        b, h, hk, first, last, i = _query_rows(heads_q, heads_kv, sq)
        sq_d = sq - shift  # the mask helpers put row i on key i + sk - sq_d
        keys = cuda.shared.array((tile, max_dim), acc)
        vals = cuda.shared.array((tile, max_dim), acc)
        q_row = cuda.local.array(max_dim, acc)
        out_row = cuda.local.array(max_dim, acc)
        active = i < sq
        lo, hi = 0, 0
        slope = 0.0
        if active:
            lo, hi = key_range(i, sq_d, sk, wl, wr)
            slope = slopes[b, h]
            for d in range(dim):
                q_row[d] = widen(q[b, h, i, d], codec) * scale
                out_row[d] = 0.0
        row_max = -math.inf
        row_sum = 0.0
        j_lo = key_range(first, sq_d, sk, wl, wr)[0]
        j_hi = key_range(last, sq_d, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, tile):
            n = min(tile, j_hi - j0)
            _stage(k, b, hk, j0, n, dim, codec, keys, 1.0)
            _stage(v, b, hk, j0, n, dim, codec, vals, 1.0)
            cuda.syncthreads()
            if active:
                for r in range(max(lo - j0, 0), min(hi - j0, n)):
                    score = _score(q_row, keys, r, dim, i, j0 + r, sq_d, sk, softcap, slope, has_alibi)[0]
                    if score > row_max:
                        alpha = online_rescale(row_max, score)
                        row_sum *= alpha
                        for d in range(dim):
                            out_row[d] *= alpha
                        row_max = score
                    p = math.exp(score - row_max)
                    row_sum += p
                    for d in range(dim):
                        out_row[d] += p * vals[r, d]
            cuda.syncthreads()
        if active:
            inv = 1.0 / row_sum if row_sum > 0.0 else 0.0
            for d in range(dim):
                out[b, h, i, d] = narrow(out_row[d] * inv, codec)
            lse[b, h, i] = finish_lse(row_max, row_sum)

    return forward


def _make_delta(acc, tile, max_dim):
    @cuda.jit
    def delta_kernel(dout, out, codec, delta):
        batch, heads, sq, dim = dout.shape
        row = cuda.grid(1)
        if row < batch * heads * sq:
            i = row % sq
            h = (row // sq) % heads
            b = row // (sq * heads)
            total = 0.0
            for d in range(dim):
                total += widen(dout[b, h, i, d], codec) * widen(out[b, h, i, d], codec)
            delta[b, h, i] = total

    return delta_kernel


def _make_dq(acc, tile, max_dim):
    @cuda.jit
    def dq_kernel(dout, q, k, v, lse, delta, codec, scale, wl, wr, softcap, slopes, has_alibi, dq):
        batch, heads_q, sq, dim = q.shape
        heads_kv, sk = k.shape[1], k.shape[2]
        b, h, hk, first, last, i = _query_rows(heads_q, heads_kv, sq)
        keys = cuda.shared.array((tile, max_dim), acc)
        vals = cuda.shared.array((tile, max_dim), acc)
        q_row = cuda.local.array(max_dim, acc)
        do_row = cuda.local.array(max_dim, acc)
        dq_row = cuda.local.array(max_dim, acc)
        active = i < sq
        lo, hi = 0, 0
        slope = 0.0
        row_lse = -math.inf
        row_delta = 0.0
        if active:
            lo, hi = key_range(i, sq, sk, wl, wr)
            slope = slopes[b, h]
            row_lse = lse[b, h, i]
            row_delta = delta[b, h, i]
            for d in range(dim):
                q_row[d] = widen(q[b, h, i, d], codec) * scale
                do_row[d] = widen(dout[b, h, i, d], codec)
                dq_row[d] = 0.0
        j_lo = key_range(first, sq, sk, wl, wr)[0]
        j_hi = key_range(last, sq, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, tile):
            n = min(tile, j_hi - j0)
            _stage(k, b, hk, j0, n, dim, codec, keys, 1.0)
            _stage(v, b, hk, j0, n, dim, codec, vals, 1.0)
            cuda.syncthreads()
            if active and row_lse != -math.inf:
                for r in range(max(lo - j0, 0), min(hi - j0, n)):
                    score, capped = _score(q_row, keys, r, dim, i, j0 + r, sq, sk, softcap, slope, has_alibi)
                    p = math.exp(score - row_lse)
                    dp = 0.0
                    for d in range(dim):
                        dp += do_row[d] * vals[r, d]
                    ds = p * (dp - row_delta) * softcap_grad(capped, softcap)
                    for d in range(dim):
                        dq_row[d] += ds * keys[r, d]
            cuda.syncthreads()
        if active:
            for d in range(dim):
                dq[b, h, i, d] = narrow(dq_row[d] * scale, codec)

    return dq_kernel


def _make_dkdv(acc, tile, max_dim):
    @cuda.jit
    def dkdv_kernel(dout, q, k, v, lse, delta, codec, scale, wl, wr, softcap, slopes, has_alibi, dk, dv):
        batch, heads_q, sq, dim = q.shape
        heads_kv, sk = k.shape[1], k.shape[2]
        group = heads_q // heads_kv
        b = cuda.blockIdx.y // heads_kv
        hk = cuda.blockIdx.y % heads_kv
        first = cuda.blockIdx.x * cuda.blockDim.x
        last = min(sk, first + cuda.blockDim.x)
        j = first + cuda.threadIdx.x
        queries = cuda.shared.array((tile, max_dim), acc)
        douts = cuda.shared.array((tile, max_dim), acc)
        row_lse = cuda.shared.array(tile, acc)
        row_delta = cuda.shared.array(tile, acc)
        k_row = cuda.local.array(max_dim, acc)
        v_row = cuda.local.array(max_dim, acc)
        dk_row = cuda.local.array(max_dim, acc)
        dv_row = cuda.local.array(max_dim, acc)
        active = j < sk
        if active:
            for d in range(dim):
                k_row[d] = widen(k[b, hk, j, d], codec)
                v_row[d] = widen(v[b, hk, j, d], codec)
                dk_row[d] = 0.0
                dv_row[d] = 0.0
        i_lo, i_hi = query_range(first, last, sq, sk, wl, wr)
        for h in range(hk * group, (hk + 1) * group):
            slope = slopes[b, h]
            for i0 in range(i_lo, i_hi, tile):
                n = min(tile, i_hi - i0)
                _stage(q, b, h, i0, n, dim, codec, queries, scale)
                _stage(dout, b, h, i0, n, dim, codec, douts, 1.0)
                for r in range(cuda.threadIdx.x, n, cuda.blockDim.x):
                    row_lse[r] = lse[b, h, i0 + r]
                    row_delta[r] = delta[b, h, i0 + r]
                cuda.syncthreads()
                if active:
                    for r in range(n):
                        i = i0 + r
                        lo, hi = key_range(i, sq, sk, wl, wr)
                        if lo <= j and j < hi and row_lse[r] != -math.inf:
                            x = 0.0
                            for d in range(dim):
                                x += queries[r, d] * k_row[d]
                            capped = softcap_score(x, softcap)
                            score = capped
                            if has_alibi:
                                score += alibi_bias(slope, i, j, sq, sk)
                            p = math.exp(score - row_lse[r])
                            dp = 0.0
                            for d in range(dim):
                                dp += douts[r, d] * v_row[d]
                            ds = p * (dp - row_delta[r]) * softcap_grad(capped, softcap)
                            for d in range(dim):
                                dv_row[d] += p * douts[r, d]
                                dk_row[d] += ds * queries[r, d]
                cuda.syncthreads()
        if active:
            for d in range(dim):
                dk[b, hk, j, d] = narrow(dk_row[d], codec)
                dv[b, hk, j, d] = narrow(dv_row[d], codec)

    return dkdv_kernel


_MAKERS = {"forward": _make_forward, "delta": _make_delta, "dq": _make_dq, "dkdv": _make_dkdv}


def _slopes(slopes, spec):
    acc = spec.accum_dtype
    if slopes is None:
        return _launch.to_device(np.zeros((spec.batch, spec.heads_q), acc)), False
    host = slopes.copy_to_host() if hasattr(slopes, "copy_to_host") else np.asarray(slopes)
    return _launch.to_device(np.broadcast_to(host.astype(acc), (spec.batch, spec.heads_q))), True


def _check_head_dim(spec):
    if spec.head_dim > config.cuda_max_head_dim:
        raise ValueError(f"q: expected head dimension D <= {config.cuda_max_head_dim} on CUDA "
                         f"(config.cuda_max_head_dim), got {spec.head_dim}")


def _options(spec, slopes):
    return (spec.codec, spec.scale, spec.window_left, spec.window_right, spec.softcap) + slopes


def forward(q, k, v, slopes, spec):
    """Launch the forward kernel; return (out, lse) as numba device arrays."""
    _check_head_dim(spec)
    out = _launch.empty(q.shape, spec.dtype)
    lse = _launch.empty(q.shape[:3], spec.accum_dtype)
    if spec.batch * spec.heads_q * spec.seq_q == 0:
        return out, lse
    acc, rows = _acc_type(spec), config.cuda_block_q
    kernel = _compiled("forward", acc, config.cuda_block_k, config.cuda_max_head_dim)
    grid = (_launch.blocks(spec.seq_q, rows), spec.batch * spec.heads_q)
    kernel[grid, rows](*(_launch.kernel_view(x) for x in (q, k, v)), spec.codec, spec.scale, spec.window_left,
                       spec.window_right, spec.shift, spec.softcap, *_slopes(slopes, spec),
                       _launch.kernel_view(out), lse)
    return out, lse


def backward(dout, q, k, v, out, lse, slopes, spec):
    """Launch the delta, dq and dk/dv kernels; return (dq, dk, dv) as device arrays."""
    _check_head_dim(spec)
    dq = _launch.empty(q.shape, spec.dtype)
    dk = _launch.empty(k.shape, spec.dtype)
    dv = _launch.empty(v.shape, spec.dtype)
    acc, rows, tile, max_dim = _acc_type(spec), config.cuda_block_q, config.cuda_block_k, config.cuda_max_head_dim
    inputs = [_launch.kernel_view(x) for x in (dout, q, k, v)]
    options = _options(spec, _slopes(slopes, spec))
    delta = _launch.empty(q.shape[:3], spec.accum_dtype)
    n_rows = spec.batch * spec.heads_q * spec.seq_q
    if n_rows:
        _compiled("delta", acc, tile, max_dim)[_launch.blocks(n_rows, rows), rows](
            inputs[0], _launch.kernel_view(out), spec.codec, delta)
        _compiled("dq", acc, tile, max_dim)[(_launch.blocks(spec.seq_q, rows), spec.batch * spec.heads_q), rows](
            *inputs, lse, delta, *options, _launch.kernel_view(dq))
    if spec.batch * spec.heads_kv * spec.seq_k:
        _compiled("dkdv", acc, tile, max_dim)[(_launch.blocks(spec.seq_k, rows), spec.batch * spec.heads_kv), rows](
            *inputs, lse, delta, *options, _launch.kernel_view(dk), _launch.kernel_view(dv))
    return dq, dk, dv


def _make_merge(acc, tile, max_dim):
    @cuda.jit
    def merge_kernel(outs, lses, in_codec, out_codec, out_mult, out, lse):
        n_parts, rows, dim = outs.shape
        r = cuda.grid(1)
        if r < rows:
            top = -math.inf
            for p in range(n_parts):
                top = max(top, lses[p, r])
            if top == -math.inf:
                for d in range(dim):
                    out[r, d] = narrow(0.0, out_codec)
                lse[r] = top
            else:
                total = 0.0
                for p in range(n_parts):
                    total += math.exp(lses[p, r] - top)
                for d in range(dim):
                    x = 0.0
                    for p in range(n_parts):
                        w = math.exp(lses[p, r] - top)
                        if w != 0.0:
                            x += w * widen(outs[p, r, d], in_codec)
                    out[r, d] = narrow(x * out_mult / total, out_codec)
                lse[r] = top + math.log(total)

    return merge_kernel


_MAKERS["merge"] = _make_merge


def merge(outs, lses, dtype, out_mult=1.0):
    """Merge stacked partial states ``outs [N, ..., D]``, ``lses [N, ...]`` on the device.

    Returns ``(out, lse)`` with ``out`` in ``dtype`` times ``out_mult``, lse in the dtype of ``lses``.
    """
    shape = tuple(outs.shape)  # the simulator's shapes take no negative indices
    n_parts, dim = shape[0], shape[-1]
    out = _launch.empty(shape[1:], dtype)
    lse = _launch.empty(tuple(lses.shape)[1:], lses.dtype)
    rows = lse.size
    if rows:
        acc = float64 if lses.dtype == np.float64 else float32
        kernel = _compiled("merge", acc, config.cuda_block_k, config.cuda_max_head_dim)
        kernel[_launch.blocks(rows, config.cuda_block_q), config.cuda_block_q](
            _launch.kernel_view(outs).reshape(n_parts, rows, dim), lses.reshape(n_parts, rows),
            codec_of(outs.dtype), codec_of(dtype), out_mult,
            _launch.kernel_view(out).reshape(rows, dim), lse.reshape(rows))
    return out, lse


def merge_states(outs, lses, dtype):
    """:func:`fastattn.merge_attention_states` on device arrays: stack the parts, then merge."""
    stacked_out = _launch.empty((len(outs),) + tuple(outs[0].shape), dtype)
    stacked_lse = _launch.empty((len(lses),) + tuple(lses[0].shape), _dtypes.accum_dtype(dtype))
    for i, (o, x) in enumerate(zip(outs, lses)):
        _launch.kernel_view(stacked_out)[i].copy_to_device(_launch.kernel_view(o))
        if x.dtype == stacked_lse.dtype:
            stacked_lse[i].copy_to_device(x)
        else:
            stacked_lse[i].copy_to_device(x.copy_to_host().astype(stacked_lse.dtype))
    return merge(stacked_out, stacked_lse, dtype)
