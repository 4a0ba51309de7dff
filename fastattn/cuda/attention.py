"""CUDA kernels of the dense attention family (numba.cuda), FlashAttention-2 style.

The twin of :mod:`fastattn.cpu.attention`.  Every kernel is compiled per input
dtype and per head-dimension bucket (:data:`fastattn.cuda._tiles.HEAD_DIMS`),
so tile sizes and per-thread arrays are compile-time constants and live in
registers; arithmetic is float32 (float64 for float64 inputs).

Forward: a block owns ``tm * ny`` query rows of one (batch, head) and walks
the visible keys ``tn * nx`` at a time.  Keys, then values, are staged in
shared memory as whole tiles; query rows pass through in chunks of 32
features.  Each thread computes a ``tm x tn`` block of scores in registers
(:mod:`fastattn.cuda._tiles`), the row maxima and sums of the online softmax
are taken one row per thread over the tile in shared memory, and each thread
updates a ``tm x (D / nx)`` slice of the output in registers.

Backward (FlashAttention-2's loop order): a ``delta`` kernel (rowwise
``dout . out``); a dK/dV kernel where a block owns a tile of keys of one KV
head and walks the query rows of every head of its group, recomputing
``P = exp(S - lse)``; and a separate dQ kernel shaped like the forward.  dQ by
a second pass rather than atomics: every output element has one writer, so the
result is deterministic and no zeroed float32 buffer or conversion pass is
needed, for the price of computing ``Q K^T`` and ``dO V^T`` twice.

Grids are one-dimensional (tiles x batch x heads, at most 2**31 - 1 blocks);
query tiles are issued from the last one, so causal blocks with the most keys
start first.
"""
import math

import numpy as np
from numba import cuda, float32, uint64

from .._config import config
from .. import _philox
from . import _device, _launch, _mma, _tensor_core
from ._device import acc_type, element_type, tile_math, udiv, umod
from ._tiles import HEAD_DIMS, bucket, pieces

_kernels = {}
_SHARED_LIMIT = 48 * 1024


def tiles(kernel, acc, db):
    """``(tm, tn, ny, nx)`` of a dense kernel for accumulation type ``acc`` and head-dim bucket ``db``.

    ``forward``/``dq``: rows are queries, columns keys.  ``dkdv``: rows are keys, columns queries.
    """
    if config.cuda_tiles is not None:
        return tuple(config.cuda_tiles)
    if acc == float32:
        if kernel == "dkdv":  # two accumulators (dK, dV) of tm x D/16 each: 4 x 2 only while D <= 64
            return (4, 2, 16, 16) if db <= 64 else (2, 2, 16, 16)
        return (4, 4, 16, 16) if db <= 128 else (4, 2, 16, 16)
    if kernel == "dkdv":
        return (2, 1, 16, 16) if db <= 128 else (1, 1, 16, 16)
    return (2, 2, 16, 16)


#: Forward and dK/dV blocks resident per SM that ptxas must allow (``launch_bounds``): 2 x 256 threads = 25%.
FORWARD_MIN_BLOCKS = 2


def launch_bounds(kernel, shape):
    """``(threads, min_blocks)`` for the forward and dK/dV kernels (registers capped for 25% occupancy),
    else None."""
    if kernel not in ("forward", "dkdv") or not shape:
        return None
    tm, tn, ny, nx = shape
    return (ny * nx, FORWARD_MIN_BLOCKS)


def _compiled(name, dtype, db, bias_dtype=None):
    """The kernel ``name`` for inputs of ``dtype``, head-dim bucket ``db`` and a bias stored as ``bias_dtype``
    (the accumulation dtype by default: also the kernels' dtype when there is no bias)."""
    dtype = np.dtype(dtype)
    acc = acc_type(dtype)
    shape = tiles(name, acc, db) if name in _TILED else ()
    bias_dtype = np.dtype(_accum_np(dtype) if bias_dtype is None else bias_dtype)
    key = (name, dtype, db, shape, bias_dtype)
    if key not in _kernels:
        make = _MAKERS[name]
        fn = make(dtype, db, *shape, bias_dtype=bias_dtype) if name in _TILED else make(dtype, db)
        _kernels[key] = _device.kernel(fn, launch_bounds(name, shape))
    return _kernels[key], shape


def _accum_np(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _extra_terms(dtype, bias_dtype):
    """``extra(x, b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)``: a score with the bias added, or
    -inf where the mask is False.  ``bias`` and ``mask`` are flat, read at element strides ``bs``/``ms``
    over ``[B, Hq, Sq, Sk]`` (0 on broadcast axes)."""
    load_bias = _device.codec(bias_dtype)[0]
    neg_inf = acc_type(dtype)(-math.inf)

    @_device.inline
    def extra(x, b, h, i, j, bias, bs, has_bias, mask, ms, has_mask):
        if has_bias:
            x += load_bias(bias[uint64(b * bs[0] + h * bs[1] + i * bs[2] + j * bs[3])])
        if has_mask:
            if not mask[uint64(b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3])]:
                x = neg_inf
        return x

    return extra


_keep = _philox.build(uint64, _device.inline).keep


def _make_forward(dtype, db, tm, tn, ny, nx, bias_dtype=None):
    keep = _keep
    load, store = _device.codec(dtype)
    acc = acc_type(dtype)
    extra = _extra_terms(dtype, _accum_np(dtype) if bias_dtype is None else bias_dtype)
    t = tile_math(acc)
    key_range, softcap_score, alibi_bias = t.key_range, t.softcap_score, t.alibi_bias
    online_rescale, finish_lse = t.online_rescale, t.finish_lse
    k_ = pieces(load, acc, db, tm, tn, ny, nx)
    scores, accumulate, clear = k_.scores, k_.accumulate, k_.clear
    rows, cols, threads, per_thread = k_.rows, k_.cols, k_.threads, k_.per_thread
    zero, one, neg_inf = acc(0.0), acc(1.0), acc(-math.inf)
    dk1, db1, cols1, vr = k_.dk + 1, db + 1, cols + 1, k_.vr

    def forward(q, k, v, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, shift, softcap, slopes, slope_stride,
                has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, out, lse):
        n_tiles = udiv(sq + rows - 1, rows)
        tile = n_tiles - 1 - umod(cuda.blockIdx.x, n_tiles)
        bh = udiv(cuda.blockIdx.x, n_tiles)
        b = udiv(bh, heads_q)
        h = bh - b * heads_q
        q0 = bh * sq  # first row of (b, h) in the [B*Hq*Sq, D] view
        k0 = (b * heads_kv + udiv(h, udiv(heads_q, heads_kv))) * sk
        tid = cuda.threadIdx.x
        tx = umod(tid, nx)
        ty = udiv(tid, nx)
        i0 = tile * rows
        n_rows = min(rows, sq - i0)
        sq_d = sq - shift  # the mask helpers put row i on key i + sk - sq_d
        a_chunk = cuda.shared.array((rows, dk1), acc)
        b_chunk = cuda.shared.array((cols, dk1), acc)
        row_buf = cuda.shared.array((vr, db1), acc)
        ps = cuda.shared.array((rows, cols1), acc)
        row_max = cuda.shared.array(rows, acc)
        row_sum = cuda.shared.array(rows, acc)
        alpha = cuda.shared.array(rows, acc)
        s = cuda.local.array((tm, tn), acc)
        o = cuda.local.array((tm, per_thread), acc)
        clear(o)
        for r in range(tid, rows, threads):
            row_max[r] = neg_inf
            row_sum[r] = zero
        slope = slopes[b * slope_stride + h] if has_alibi else zero
        j_lo = key_range(i0, sq_d, sk, wl, wr)[0]
        j_hi = key_range(i0 + n_rows - 1, sq_d, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, cols):
            n_keys = min(cols, j_hi - j0)
            scores(q, q0 + i0, n_rows, scale, k, k0 + j0, n_keys, one, dim, a_chunk, b_chunk, s)
            for r in range(tm):
                i = i0 + ty * tm + r
                lo, hi = key_range(i, sq_d, sk, wl, wr)
                for c in range(tn):
                    j = j0 + tx + nx * c
                    x = neg_inf
                    if i < sq and lo <= j and j < hi:
                        x = softcap_score(s[r, c], softcap)
                        if has_alibi:
                            x += alibi_bias(slope, i, j, sq_d, sk)
                        x = extra(x, b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)
                    ps[ty * tm + r, tx + nx * c] = x
            cuda.syncthreads()
            for r in range(tid, rows, threads):  # the online softmax, one row per thread
                top = row_max[r]
                for c in range(n_keys):
                    top = max(top, ps[r, c])
                total = zero
                for c in range(n_keys):
                    p = zero
                    if top != neg_inf:
                        p = math.exp(ps[r, c] - top)
                    total += p
                    if drop_scale > zero:  # dropout after the sum: lse stays that of every key
                        p = p * drop_scale if keep(drop[0], drop[1], uint64(b) + drop[3], h, i0 + r, j0 + c, drop[2]) else zero
                    ps[r, c] = p
                a = online_rescale(row_max[r], top)
                alpha[r] = a
                row_sum[r] = row_sum[r] * a + total
                row_max[r] = top
            cuda.syncthreads()
            for r in range(tm):
                a = alpha[ty * tm + r]
                for u in range(per_thread):
                    o[r, u] *= a
            accumulate(ps, v, k0 + j0, n_keys, dim, one, row_buf, o)
        cuda.syncthreads()
        for r in range(tm):
            i = i0 + ty * tm + r
            if i < sq:
                total = row_sum[ty * tm + r]
                inv = one / total if total > zero else zero
                for u in range(per_thread):
                    d = tx + nx * u
                    if d < dim:
                        out[uint64(q0 + i), uint64(d)] = store(o[r, u] * inv)
                if tx == 0:
                    lse[uint64(q0 + i)] = finish_lse(row_max[ty * tm + r], total)

    return forward


def _make_delta(dtype, db):
    load = _device.codec(dtype)[0]
    acc = acc_type(dtype)
    zero = acc(0.0)

    def delta_kernel(dout, out, dim, delta):
        row = cuda.grid(1)
        if row < delta.shape[0]:
            total = zero
            for d in range(dim):
                total += load(dout[row, d]) * load(out[row, d])
            delta[row] = total

    return delta_kernel


def _make_dq(dtype, db, tm, tn, ny, nx, bias_dtype=None):
    keep = _keep
    load, store = _device.codec(dtype)
    acc = acc_type(dtype)
    extra = _extra_terms(dtype, _accum_np(dtype) if bias_dtype is None else bias_dtype)
    t = tile_math(acc)
    key_range, softcap_score, softcap_grad, alibi_bias = t.key_range, t.softcap_score, t.softcap_grad, t.alibi_bias
    k_ = pieces(load, acc, db, tm, tn, ny, nx)
    scores, accumulate, clear = k_.scores, k_.accumulate, k_.clear
    rows, cols, per_thread = k_.rows, k_.cols, k_.per_thread
    zero, one, neg_inf = acc(0.0), acc(1.0), acc(-math.inf)
    dk1, db1, cols1, vr = k_.dk + 1, db + 1, cols + 1, k_.vr

    def dq_kernel(dout, q, k, v, lse, delta, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, softcap, slopes,
                  slope_stride, has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, dbias, dbs,
                  want_dbias, dq):
        n_tiles = (sq + rows - 1) // rows
        tile = n_tiles - 1 - cuda.blockIdx.x % n_tiles
        bh = cuda.blockIdx.x // n_tiles
        b = bh // heads_q
        h = bh - b * heads_q
        q0 = bh * sq
        k0 = (b * heads_kv + h // (heads_q // heads_kv)) * sk
        tx = cuda.threadIdx.x % nx
        ty = cuda.threadIdx.x // nx
        i0 = tile * rows
        n_rows = min(rows, sq - i0)
        a_chunk = cuda.shared.array((rows, dk1), acc)
        b_chunk = cuda.shared.array((cols, dk1), acc)
        row_buf = cuda.shared.array((vr, db1), acc)
        ds_s = cuda.shared.array((rows, cols1), acc)
        s = cuda.local.array((tm, tn), acc)
        dp = cuda.local.array((tm, tn), acc)
        g = cuda.local.array((tm, per_thread), acc)
        row_lse = cuda.local.array(tm, acc)
        row_delta = cuda.local.array(tm, acc)
        clear(g)
        for r in range(tm):
            i = i0 + ty * tm + r
            row_lse[r] = neg_inf
            row_delta[r] = zero
            if i < sq:
                row_lse[r] = lse[uint64(q0 + i)]
                row_delta[r] = delta[uint64(q0 + i)]
        slope = slopes[b * slope_stride + h] if has_alibi else zero
        j_lo = key_range(i0, sq, sk, wl, wr)[0]
        j_hi = key_range(i0 + n_rows - 1, sq, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, cols):
            n_keys = min(cols, j_hi - j0)
            scores(dout, q0 + i0, n_rows, one, v, k0 + j0, n_keys, one, dim, a_chunk, b_chunk, dp)
            scores(q, q0 + i0, n_rows, scale, k, k0 + j0, n_keys, one, dim, a_chunk, b_chunk, s)
            for r in range(tm):
                i = i0 + ty * tm + r
                lo, hi = key_range(i, sq, sk, wl, wr)
                for c in range(tn):
                    j = j0 + tx + nx * c
                    ds = zero
                    if i < sq and lo <= j and j < hi and row_lse[r] != neg_inf:
                        capped = softcap_score(s[r, c], softcap)
                        x = capped
                        if has_alibi:
                            x += alibi_bias(slope, i, j, sq, sk)
                        x = extra(x, b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)
                        p = math.exp(x - row_lse[r])
                        dpv = dp[r, c]
                        if drop_scale > zero:
                            dpv = dpv * drop_scale if keep(drop[0], drop[1], uint64(b) + drop[3], h, i, j, drop[2]) else zero
                        ds = p * (dpv - row_delta[r])
                        if want_dbias:  # the gradient of the scores after softcap; broadcast axes meet here
                            cuda.atomic.add(dbias, uint64(b * dbs[0] + h * dbs[1] + i * dbs[2] + j * dbs[3]), ds)
                        ds *= softcap_grad(capped, softcap)
                    ds_s[ty * tm + r, tx + nx * c] = ds
            accumulate(ds_s, k, k0 + j0, n_keys, dim, one, row_buf, g)
        for r in range(tm):
            i = i0 + ty * tm + r
            if i < sq:
                for u in range(per_thread):
                    d = tx + nx * u
                    if d < dim:
                        dq[uint64(q0 + i), uint64(d)] = store(g[r, u] * scale)

    return dq_kernel


def _make_dkdv(dtype, db, tm, tn, ny, nx, bias_dtype=None):
    keep = _keep
    load, store = _device.codec(dtype)
    acc = acc_type(dtype)
    extra = _extra_terms(dtype, _accum_np(dtype) if bias_dtype is None else bias_dtype)
    t = tile_math(acc)
    key_range, query_range, softcap_score, softcap_grad = t.key_range, t.query_range, t.softcap_score, t.softcap_grad
    alibi_bias = t.alibi_bias
    k_ = pieces(load, acc, db, tm, tn, ny, nx)
    scores, accumulate, clear = k_.scores, k_.accumulate, k_.clear
    rows, cols, threads, per_thread = k_.rows, k_.cols, k_.threads, k_.per_thread
    zero, one, neg_inf = acc(0.0), acc(1.0), acc(-math.inf)
    dk1, db1, cols1, vr = k_.dk + 1, db + 1, cols + 1, k_.vr

    def dkdv_kernel(dout, q, k, v, lse, delta, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, softcap, slopes,
                    slope_stride, has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, dk, dv):
        group = heads_q // heads_kv
        n_tiles = (sk + rows - 1) // rows
        tile = cuda.blockIdx.x % n_tiles
        bh = cuda.blockIdx.x // n_tiles  # b * heads_kv + KV head
        b = bh // heads_kv
        k0 = bh * sk
        tid = cuda.threadIdx.x
        tx = tid % nx
        ty = tid // nx
        j0 = tile * rows
        n_keys = min(rows, sk - j0)
        a_chunk = cuda.shared.array((rows, dk1), acc)
        b_chunk = cuda.shared.array((cols, dk1), acc)
        row_buf = cuda.shared.array((vr, db1), acc)
        p_s = cuda.shared.array((rows, cols1), acc)
        ds_s = cuda.shared.array((rows, cols1), acc)
        row_lse = cuda.shared.array(cols, acc)
        row_delta = cuda.shared.array(cols, acc)
        st = cuda.local.array((tm, tn), acc)
        dpt = cuda.local.array((tm, tn), acc)
        gk = cuda.local.array((tm, per_thread), acc)
        gv = cuda.local.array((tm, per_thread), acc)
        clear(gk)
        clear(gv)
        i_lo, i_hi = query_range(j0, j0 + n_keys, sq, sk, wl, wr)
        for h in range((bh - b * heads_kv) * group, (bh - b * heads_kv + 1) * group):
            slope = slopes[b * slope_stride + h] if has_alibi else zero
            q0 = (b * heads_q + h) * sq
            for i0 in range(i_lo, i_hi, cols):
                n_q = min(cols, i_hi - i0)
                for c in range(tid, cols, threads):
                    row_lse[c] = neg_inf
                    row_delta[c] = zero
                    if c < n_q:
                        row_lse[c] = lse[uint64(q0 + i0 + c)]
                        row_delta[c] = delta[uint64(q0 + i0 + c)]
                scores(v, k0 + j0, n_keys, one, dout, q0 + i0, n_q, one, dim, a_chunk, b_chunk, dpt)
                scores(k, k0 + j0, n_keys, one, q, q0 + i0, n_q, scale, dim, a_chunk, b_chunk, st)
                for r in range(tm):
                    j = j0 + ty * tm + r
                    for c in range(tn):
                        ci = tx + nx * c
                        i = i0 + ci
                        lo, hi = key_range(i, sq, sk, wl, wr)
                        p = zero
                        ds = zero
                        if ci < n_q and j < j0 + n_keys and lo <= j and j < hi and row_lse[ci] != neg_inf:
                            capped = softcap_score(st[r, c], softcap)
                            x = capped
                            if has_alibi:
                                x += alibi_bias(slope, i, j, sq, sk)
                            x = extra(x, b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)
                            p = math.exp(x - row_lse[ci])
                            m = one  # dropout: the key's keep / (1 - p), 0 if dropped
                            if drop_scale > zero:
                                m = drop_scale if keep(drop[0], drop[1], uint64(b) + drop[3], h, i, j, drop[2]) else zero
                            ds = p * (dpt[r, c] * m - row_delta[ci]) * softcap_grad(capped, softcap)
                            p *= m
                        p_s[ty * tm + r, ci] = p
                        ds_s[ty * tm + r, ci] = ds
                accumulate(ds_s, q, q0 + i0, n_q, dim, scale, row_buf, gk)
                accumulate(p_s, dout, q0 + i0, n_q, dim, one, row_buf, gv)
        for r in range(tm):
            j = j0 + ty * tm + r
            if j < sk:
                for u in range(per_thread):
                    d = tx + nx * u
                    if d < dim:
                        dk[uint64(k0 + j), uint64(d)] = store(gk[r, u])
                        dv[uint64(k0 + j), uint64(d)] = store(gv[r, u])

    return dkdv_kernel


def _make_merge(dtype, out_dtype):
    """Merge of partial states stored in ``dtype`` into an output of ``out_dtype``."""
    load = _device.codec(dtype)[0]
    store = _device.codec(out_dtype)[1]
    acc = acc_type(dtype)
    zero, neg_inf = acc(0.0), acc(-math.inf)

    def merge_kernel(outs, lses, out_mult, out, lse):
        """One block a row: every thread weighs the parts (the row's lse values are read by the
        whole block at once), then the threads share the row's features, reads coalesced."""
        n_parts, n_rows, dim = outs.shape
        r = cuda.blockIdx.x
        top = neg_inf
        for p in range(n_parts):
            top = max(top, lses[p, r])
        total = zero
        if top != neg_inf:
            for p in range(n_parts):
                total += math.exp(lses[p, r] - top)
        scale = zero
        if total > zero:
            scale = out_mult / total
        for d in range(cuda.threadIdx.x, dim, cuda.blockDim.x):
            x = zero
            for p in range(n_parts):
                if lses[p, r] != neg_inf:
                    x += math.exp(lses[p, r] - top) * load(outs[p, r, d])
            out[r, d] = store(x * scale)
        if cuda.threadIdx.x == 0:
            lse[r] = top + math.log(total) if total > zero else neg_inf

    return merge_kernel


_MAKERS = {"forward": _make_forward, "delta": _make_delta, "dq": _make_dq, "dkdv": _make_dkdv}
_TILED = ("forward", "dq", "dkdv")


def _kernel(name, dtype, db):
    return _compiled(name, dtype, db)[0]


def _merge_kernel(dtype, out_dtype):
    key = ("merge", np.dtype(dtype), np.dtype(out_dtype))
    if key not in _kernels:
        _kernels[key] = cuda.jit(_make_merge(dtype, out_dtype))
    return _kernels[key]


# --- host side ---------------------------------------------------------------------

def _check_head_dim(spec):
    if spec.head_dim > config.cuda_max_head_dim:
        raise ValueError(f"q: expected head dimension D <= {config.cuda_max_head_dim} on CUDA "
                         f"(config.cuda_max_head_dim), got {spec.head_dim}")
    return bucket(spec.head_dim)


def slopes_args(slopes, spec):
    """``(slopes, stride, has_alibi)`` for a kernel: a flat device array read at ``b * stride + h``.

    Without ALiBi a one-element array that the kernels never read.  Slopes of
    another dtype than the accumulation's are converted through the host (the
    one round trip, only then).
    """
    acc_np = np.dtype(spec.accum_dtype)
    if slopes is None:
        return cuda.device_array(1, acc_np), 0, False
    shape = tuple(slopes.shape)
    if np.dtype(slopes.dtype) != acc_np or not slopes.is_c_contiguous():
        slopes = _launch.to_device(slopes.copy_to_host().astype(acc_np))
    return slopes.reshape(int(np.prod(shape))), (shape[-1] if len(shape) == 2 else 0), True


def _threads(shape):
    tm, tn, ny, nx = shape
    return ny * nx


def _sizes(spec):
    return spec.heads_q, spec.heads_kv, spec.seq_q, spec.seq_k, spec.head_dim


def _extra_args(extra, spec):
    """``(bias, strides, has_bias, mask, strides, has_mask)`` for a kernel, and the bias's dtype.

    The caller's arrays flat, read at element strides over ``[B, Hq, Sq, Sk]``
    (0 on broadcast axes); without them one-element arrays the kernels never read.
    """
    from .._validate import element_strides

    none = (0, 0, 0, 0)
    if extra and extra.bias is not None:
        bias = _launch.contiguous(_launch.kernel_view(extra.bias))
        bias_args = (_launch.flat(bias), element_strides(tuple(bias.shape)), True)
        bias_dtype = np.dtype(extra.bias.dtype)
    else:
        bias_args = (cuda.device_array(1, spec.accum_dtype), none, False)
        bias_dtype = np.dtype(spec.accum_dtype)
    if extra and extra.mask is not None:
        mask = _launch.contiguous(extra.mask)
        mask_args = (_launch.flat(mask), element_strides(tuple(mask.shape)), True)
    else:
        mask_args = (cuda.device_array(1, np.bool_), none, False)
    return (*bias_args, *mask_args), bias_dtype


def _dropout_args(dropout, spec, batch_offset=0):
    """``(drop, drop_scale)`` for a kernel: ``[seed_lo, seed_hi, threshold, batch_offset]`` on the device and
    ``1 / (1 - p)``, or a stand-in and 0 without dropout.  ``batch_offset``: the batch index of the launch's
    first batch in the keep bits' counter (a packed batch's sequence, launched alone)."""
    acc_np = np.dtype(spec.accum_dtype).type
    if dropout is None:
        return cuda.to_device(np.zeros(4, np.uint64)), acc_np(0)
    seed, p = dropout
    words = np.array([*_philox.seed_words(seed), _philox.threshold(p), batch_offset], np.uint64)
    return cuda.to_device(words), acc_np(1.0 / (1.0 - p))


def use_mma(spec):
    """Whether a call's kernels run on tensor cores (:mod:`fastattn.cuda._tensor_core`): float16/bfloat16
    inputs with an even head dimension, ``config.cuda_mma`` on, and a GPU of compute capability 8.0 or
    more with NVRTC and nvJitLink to link the instructions' CUDA C++ (:func:`fastattn.cuda._mma.linkable`;
    the simulator emulates the instructions).  The launch also needs its arrays 4-byte aligned
    (:func:`fastattn.cuda._launch.words`), else it takes the SIMT kernels."""
    if not config.cuda_mma or spec.head_dim % 2 or np.dtype(spec.dtype) not in (np.float16, _dtype("bfloat16")):
        return False
    return _device.simulated() or (_device.compute_capability() >= _mma.MIN_CC and _mma.linkable())


def _mma_kernel(dtype, db, bias_dtype, warps, name="forward"):
    """The tensor-core ``forward``, ``dq`` or ``dkdv`` kernel (:mod:`fastattn.cuda._tensor_core`)."""
    key = (name + "-mma", np.dtype(dtype), db, np.dtype(bias_dtype), warps)
    if key not in _kernels:
        kind = "f16" if np.dtype(dtype) == np.float16 else "bf16"
        make = {"forward": _tensor_core.make_forward, "dq": _tensor_core.make_dq, "dkdv": _tensor_core.make_dkdv}[name]
        fn = make(kind, db, _extra_terms(dtype, bias_dtype), _keep, warps)
        _kernels[key] = _device.kernel(fn, _tensor_core.launch_bounds(db, warps, name), lto=True)
    return _kernels[key]


def forward(q, k, v, slopes, spec, extra=None, dropout=None, batch_offset=0):
    """Launch the forward kernel; return (out, lse) as numba device arrays.

    ``extra`` is the call's :class:`~fastattn._validate.Extra` (bias and mask) or None, ``dropout`` its
    ``(seed, p)`` or None.  float16/bfloat16 inputs run on tensor cores where :func:`use_mma` says so.
    """
    db = _check_head_dim(spec)
    out = _launch.empty(q.shape, spec.dtype)
    lse = _launch.empty(q.shape[:3], spec.accum_dtype)
    if spec.batch * spec.heads_q * spec.seq_q == 0:
        return out, lse
    acc_np = np.dtype(spec.accum_dtype).type
    extra_args, bias_dtype = _extra_args(extra, spec)
    options = (*_sizes(spec), acc_np(spec.scale), spec.window_left, spec.window_right, spec.shift,
               acc_np(spec.softcap), *slopes_args(slopes, spec), *extra_args,
               *_dropout_args(dropout, spec, batch_offset))
    words = _launch.words(*(_launch.rows(x) for x in (q, k, v, out))) if use_mma(spec) else None
    if words is not None:
        warps = config.cuda_mma_warps
        grid = _launch.blocks(spec.seq_q, 16 * warps) * spec.batch * spec.heads_q
        _mma_kernel(spec.dtype, db, bias_dtype, warps)[grid, 32 * warps](*words[:3], *options, words[3],
                                                                         _launch.flat(lse))
        return out, lse
    kernel, shape = _compiled("forward", spec.dtype, db, bias_dtype)
    grid = _launch.blocks(spec.seq_q, shape[0] * shape[2]) * spec.batch * spec.heads_q
    kernel[grid, _threads(shape)](*(_launch.rows(x) for x in (q, k, v)), *options, _launch.rows(out),
                                  _launch.flat(lse))
    return out, lse


def backward(dout, q, k, v, out, lse, slopes, spec, extra=None, want_dbias=False, dropout=None, batch_offset=0):
    """Launch the delta, dq and dk/dv kernels; return (dq, dk, dv, dbias) as device arrays.

    ``dbias`` (accumulation dtype, the caller's bias shape) is summed with
    atomics in the dq kernel; None unless ``want_dbias`` and there is a bias.
    """
    db = _check_head_dim(spec)
    dq = _launch.empty(q.shape, spec.dtype)
    dk = _launch.empty(k.shape, spec.dtype)
    dv = _launch.empty(v.shape, spec.dtype)
    acc_np = np.dtype(spec.accum_dtype).type
    inputs = [_launch.rows(x) for x in (dout, q, k, v)]
    words = _launch.words(*inputs, *(_launch.rows(x) for x in (dq, dk, dv))) if use_mma(spec) else None
    extra_args, bias_dtype = _extra_args(extra, spec)
    options = (*_sizes(spec), acc_np(spec.scale), spec.window_left, spec.window_right, acc_np(spec.softcap),
               *slopes_args(slopes, spec), *extra_args, *_dropout_args(dropout, spec, batch_offset))
    want_dbias = bool(want_dbias and extra and extra.bias is not None)
    dbias = None
    if want_dbias:
        from .._validate import element_strides

        dbias = cuda.to_device(np.zeros(extra.bias.shape, spec.accum_dtype))
        dbias_args = (_launch.flat(dbias), element_strides(tuple(extra.bias.shape)), True)
    else:
        dbias_args = (cuda.device_array(1, spec.accum_dtype), (0, 0, 0, 0), False)
    delta = _launch.empty(q.shape[:3], spec.accum_dtype)
    lse = _launch.flat(lse)
    n_rows = spec.batch * spec.heads_q * spec.seq_q
    threads = config.cuda_threads
    if n_rows:
        _kernel("delta", spec.dtype, db)[_launch.blocks(n_rows, threads), threads](
            inputs[0], _launch.rows(out), spec.head_dim, _launch.flat(delta))
        if words is not None:
            warps = config.cuda_mma_warps
            grid = _launch.blocks(spec.seq_q, 16 * warps) * spec.batch * spec.heads_q
            _mma_kernel(spec.dtype, db, bias_dtype, warps, "dq")[grid, 32 * warps](
                *words[:4], lse, _launch.flat(delta), *options, *dbias_args, words[4])
        else:
            kernel, shape = _compiled("dq", spec.dtype, db, bias_dtype)
            grid = _launch.blocks(spec.seq_q, shape[0] * shape[2]) * spec.batch * spec.heads_q
            kernel[grid, _threads(shape)](*inputs, lse, _launch.flat(delta), *options, *dbias_args,
                                          _launch.rows(dq))
    if spec.batch * spec.heads_kv * spec.seq_k and words is not None:
        warps = config.cuda_mma_warps
        grid = _launch.blocks(spec.seq_k, 16 * warps) * spec.batch * spec.heads_kv
        _mma_kernel(spec.dtype, db, bias_dtype, warps, "dkdv")[grid, 32 * warps](
            *words[:4], lse, _launch.flat(delta), *options, *words[5:])
    elif spec.batch * spec.heads_kv * spec.seq_k:
        kernel, shape = _compiled("dkdv", spec.dtype, db, bias_dtype)
        grid = _launch.blocks(spec.seq_k, shape[0] * shape[2]) * spec.batch * spec.heads_kv
        kernel[grid, _threads(shape)](*inputs, lse, _launch.flat(delta), *options, _launch.rows(dk),
                                      _launch.rows(dv))
    if dbias is not None:
        dbias = dbias.reshape(extra.bias_shape) if extra.bias_shape else dbias.reshape(())
    return dq, dk, dv, dbias


def _make_cast(src_dtype, dtype):
    load = _device.codec(src_dtype)[0]
    store = _device.codec(dtype)[1]

    def cast_kernel(src, dst):
        e = cuda.grid(1)
        if e < dst.size:
            dst[e] = store(load(src[e]))

    return cast_kernel


def cast(x, dtype):
    """A device array in ``dtype`` (a gradient in accumulation precision, returned in its input's dtype)."""
    dtype = np.dtype(dtype)
    if np.dtype(x.dtype) == dtype:
        return x
    key = ("cast", np.dtype(x.dtype), dtype)
    if key not in _kernels:
        _kernels[key] = cuda.jit(_make_cast(x.dtype, dtype))
    shape = tuple(x.shape)
    out = _launch.empty(shape, dtype)
    n = int(np.prod(shape))
    if n:
        threads = config.cuda_threads
        _kernels[key][_launch.blocks(n, threads), threads](x.reshape(n), _launch.kernel_view(out).reshape(n))
    return out


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
        threads = min(config.cuda_threads, max(1, -(-dim // 32)) * 32)  # one block a row, a warp per 32 features
        acc_np = np.dtype(lses.dtype).type
        _merge_kernel(outs.dtype, dtype)[rows, threads](
            _launch.kernel_view(outs).reshape(n_parts, rows, dim), lses.reshape(n_parts, rows),
            acc_np(out_mult), _launch.kernel_view(out).reshape(rows, dim), lse.reshape(rows))
    return out, lse


def merge_states(outs, lses, dtype):
    """:func:`fastattn.merge_attention_states` on device arrays: stack the parts, then merge."""
    from .._dtypes import accum_dtype

    stacked_out = _launch.empty((len(outs),) + tuple(outs[0].shape), dtype)
    stacked_lse = _launch.empty((len(lses),) + tuple(lses[0].shape), accum_dtype(dtype))
    for i, (o, x) in enumerate(zip(outs, lses)):
        _launch.kernel_view(stacked_out)[i].copy_to_device(_launch.kernel_view(o))
        if x.dtype == stacked_lse.dtype:
            stacked_lse[i].copy_to_device(x)
        else:
            stacked_lse[i].copy_to_device(x.copy_to_host().astype(stacked_lse.dtype))
    return merge(stacked_out, stacked_lse, dtype)


# --- what cuda-report compiles -------------------------------------------------------

DTYPES = ("float32", "float64", "float16", "bfloat16")
_ROLES = {"forward": "forward", "dq": "backward", "dkdv": "backward", "delta": "backward"}


def _dtype(name):
    from .._dtypes import dtype_named

    return dtype_named(name)


def signature(name, dtype, db=None):
    """The argument types a kernel is launched with (C-contiguous arrays)."""
    from numba import boolean, int32, int64, types

    dtype = np.dtype(dtype)
    acc = acc_type(dtype)
    x2, a1 = element_type(dtype)[:, ::1], acc[::1]
    sizes = (int32,) * 5
    mask = (int32, int32)
    strides = types.UniTuple(int64, 4)
    extra = (a1, strides, boolean, boolean[::1], strides, boolean)  # bias (accumulation dtype), mask
    extra += (uint64[::1], acc)  # dropout: seed words and threshold, scale
    if name == "forward":
        return (x2, x2, x2, *sizes, acc, *mask, int32, acc, a1, int32, boolean, *extra, x2, a1)
    if name == "delta":
        return (x2, x2, int32, a1)
    options = (*sizes, acc, *mask, acc, a1, int32, boolean, *extra)
    if name == "dq":
        return (x2, x2, x2, x2, a1, a1, *options, a1, strides, boolean, x2)
    return (x2, x2, x2, x2, a1, a1, *options, x2, x2)


def variants(head_dims=None):
    """Every dense kernel in every dtype and head-dim bucket the dispatch launches (for ``cuda-report``)."""
    variants = []
    for name in ("forward", "delta", "dq", "dkdv"):
        for dtype_name in DTYPES:
            dtype = _dtype(dtype_name)
            for db in (HEAD_DIMS if name != "delta" else (HEAD_DIMS[-1],)):
                if head_dims is not None and name != "delta" and db not in head_dims:
                    continue
                shape = tiles(name, acc_type(dtype), db) if name in _TILED else ()
                threads = _threads(shape) if shape else config.cuda_threads
                variants.append(_launch.Variant(name, _ROLES[name], dtype_name, db if name != "delta" else 0,
                                                threads, _MAKERS[name](dtype, db, *shape),
                                                signature(name, dtype, db), launch_bounds(name, shape)))
    makers = {"forward": (_tensor_core.make_forward, _tensor_core.signature),
              "dq": (_tensor_core.make_dq, _tensor_core.dq_signature),
              "dkdv": (_tensor_core.make_dkdv, _tensor_core.dkdv_signature)}
    for dtype_name in ("float16", "bfloat16"):  # the tensor-core kernels (sm_80+)
        dtype = _dtype(dtype_name)
        kind = "f16" if dtype_name == "float16" else "bf16"
        for db in HEAD_DIMS:
            if head_dims is None or db in head_dims:
                for name, (make, sig) in makers.items():
                    variants.append(_launch.Variant(
                        f"{name}-mma", "forward" if name == "forward" else "backward", dtype_name, db,
                        32 * _tensor_core.WARPS, make(kind, db, _extra_terms(dtype, _accum_np(dtype)), _keep), sig(),
                        _tensor_core.launch_bounds(db, name=name), _mma.MIN_CC, (_mma.SOURCE,)))
    for dtype_name in ("float32", "float64"):
        dtype = _dtype(dtype_name)
        acc = acc_type(dtype)
        outs = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
        for out_name in outs if dtype_name == "float32" else ("float64",):
            out = _dtype(out_name)
            sig = (acc[:, :, ::1], acc[:, ::1], acc, element_type(out)[:, ::1], acc[::1])
            variants.append(_launch.Variant(f"merge->{out_name}", "other", dtype_name, 0, config.cuda_threads,
                                            _make_merge(dtype, out), sig))
    return variants
