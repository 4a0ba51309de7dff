"""The online-softmax tile steps every CPU attention kernel runs between its GEMMs.

A tile is a block of scores ``s [m, n]``: ``m`` query rows against ``n``
consecutive keys starting at key ``j0``.  Row ``r`` is query row
``i0 + r % period`` of head ``r // period`` of the tile: a dense kernel passes
one head (``period = m``), a paged decode kernel stacks the query heads of one
KV group (``period`` = rows per head) so the keys are read once per group.
``slopes[r // period]`` is that head's ALiBi slope.

Loops run over slices from index 0 so that LLVM can prove the indices
non-negative and vectorise (a loop from a computed start keeps numba's
negative-index wraparound and stays scalar).
"""
import numpy as np
from numba import njit
from numba.extending import overload

from .._philox import philox
from .._tile import alibi_bias, key_range, query_range, softcap_grad
from ._gemm import add_matmul, add_matmul_tn, matmul_nt, pack_transposed
from ._fastmath import FASTMATH, decode_one, decode_rows, exp_row, exp_shifted, max_of, softcap_fast


def decode_tile(x, a, h, r0, n, dst, codec):
    """Decode rows ``r0 : r0 + n`` of head ``h`` into ``dst [n, D]``: ``x[a, h, r0:r0 + n]`` of a dense
    ``[B, H, S, D]`` array, ``x[r0:r0 + n, h]`` of a packed ``[total, H, D]`` one (read in place: element
    by element with three indices, which LLVM vectorises along a row; views of single rows cost 3x)."""


@overload(decode_tile, inline="always")
def _decode_tile(x, a, h, r0, n, dst, codec):
    if x.ndim == 4:
        def dense(x, a, h, r0, n, dst, codec):
            decode_rows(x[a, h, r0:r0 + n], dst, codec)
        return dense

    def packed(x, a, h, r0, n, dst, codec):
        for r in range(n):
            for c in range(dst.shape[1]):
                dst[r, c] = decode_one(x[r0 + r, h, c], codec)
    return packed


def tile_rows(x, a, h, r0, n, buf, codec):
    """Rows ``r0 : r0 + n`` of head ``h`` (see :func:`decode_tile`) in accumulation precision: the rows themselves when they
    are contiguous and already in that precision (no copy), else decoded into ``buf[:n]``."""


@overload(tile_rows, inline="always", fastmath=FASTMATH)
def _tile_rows(x, a, h, r0, n, buf, codec):
    if x.dtype == buf.dtype and x.layout == "C" and x.ndim == 4:
        return lambda x, a, h, r0, n, buf, codec: x[a, h, r0:r0 + n]

    def decoded(x, a, h, r0, n, buf, codec):
        part = buf[:n]
        decode_tile(x, a, h, r0, n, part, codec)
        return part
    return decoded


def row_of(x, a, h, r):
    """Row ``r`` of head ``h``: ``x[a, h, r]`` of a dense ``[B, H, S, ...]`` array, ``x[r, h]`` of a packed one."""


@overload(row_of, inline="always")
def _row_of(x, a, h, r):
    if x.ndim == 4:
        return lambda x, a, h, r: x[a, h, r]
    return lambda x, a, h, r: x[r, h]


def set_lse(lse, a, h, r, value):
    """``lse[a, h, r] = value`` of a dense ``[B, H, S]`` lse, ``lse[h, r]`` of a packed ``[H, total]`` one."""


@overload(set_lse, inline="always")
def _set_lse(lse, a, h, r, value):
    if lse.ndim == 3:
        def dense(lse, a, h, r, value):
            lse[a, h, r] = value
        return dense

    def packed(lse, a, h, r, value):
        lse[h, r] = value
    return packed


@njit(inline="always")
def _visible_part(row, i, j0, sq, sk, wl, wr):
    """Zero the masked columns of a tile row (keys from j0); return the visible slice and its start."""
    lo, hi = key_range(i, sq, sk, wl, wr)
    n = row.size
    c0 = min(max(lo - j0, 0), n)
    c1 = max(min(hi - j0, n), c0)
    if c0 == 0 and c1 == n:  # the common case: no view to make
        return row, 0
    row[:c0] = 0
    row[c1:] = 0
    return row[c0:c1], c0


@njit(fastmath=FASTMATH)
def _rescale(row_max, new_max, zero):
    """:func:`fastattn._tile.online_rescale` with the fast exponential (``zero``: 0 in their precision)."""
    if row_max == -np.inf:
        return zero
    return exp_shifted(row_max, new_max)


@njit(fastmath=FASTMATH, cache=True)
def softmax_tile(s, i0, period, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, extra, has_extra,
                 row_max, row_sum, acc):
    """Turn a tile of raw scores into exp(score - running max), updating the running state.

    With ``has_extra``, ``extra [m, n]`` (see :func:`extra_tile`) is added to
    the scores after softcap and ALiBi.  ``row_max``, ``row_sum`` and the rows
    of the output accumulator ``acc`` are rescaled when a row's maximum grows;
    the caller then adds ``s @ v``.
    """
    m = s.shape[0]
    for r in range(m):
        i = i0 + r % period
        seen, c0 = _visible_part(s[r], i, j0, sq, sk, wl, wr)
        if seen.size == 0:
            continue
        if softcap > 0 or has_alibi or has_extra:
            _transform_scores(seen, i, j0 + c0, sq, sk, softcap, slopes[r // period], has_alibi,
                              extra[r, c0:c0 + seen.size], has_extra)
        new_max = max(row_max[r], max_of(seen))
        if new_max == -np.inf:  # every key so far masked out: nothing to add
            seen[:] = 0
            continue
        alpha = _rescale(row_max[r], new_max, row_sum[r] * 0)
        total = exp_row(seen, new_max)
        row_sum[r] = row_sum[r] * alpha + total
        row_max[r] = new_max
        if alpha != 1.0:
            acc_row = acc[r]
            for d in range(acc_row.size):
                acc_row[d] *= alpha


@njit(fastmath=FASTMATH, cache=True)
def _transform_scores(seen, i, j, sq, sk, softcap, slope, has_alibi, extra, has_extra):
    """softcap, ALiBi, then the extra terms on the visible scores of row i, which start at key j."""
    if softcap <= 0 and not has_alibi:  # the extra terms alone: a vectorised add
        for c in range(seen.size):
            seen[c] += extra[c]
        return
    for c in range(seen.size):
        x = softcap_fast(seen[c], softcap)
        if has_alibi:
            x += alibi_bias(slope, i, j + c, sq, sk)
        if has_extra:
            x += extra[c]
        seen[c] = x


@njit(fastmath=FASTMATH, cache=True)
def extra_tile(extra, b, h, i0, m, j0, n, out):
    """``out[r, c]`` = bias of row ``i0 + r``, key ``j0 + c`` of (b, h), or -inf where the mask is False.

    ``extra`` is ``(bias, bias_strides, codec, has_bias, mask, mask_strides,
    has_mask)``: the caller's arrays flat (1-d, so one compiled kernel serves
    every broadcast shape) with the element strides of ``[B, Hq, Sq, Sk]``
    (0 on broadcast axes).
    """
    bias, bs, codec, has_bias, mask, ms, has_mask = extra
    for r in range(m):
        row = out[r]
        if has_bias:
            at = b * bs[0] + h * bs[1] + (i0 + r) * bs[2] + j0 * bs[3]
            if bs[3] == 1:  # keys contiguous: a straight (vectorised) copy
                part = bias[at:at + n]
                for c in range(n):
                    row[c] = decode_one(part[c], codec)
            else:  # one bias for every key of the row
                row[:] = decode_one(bias[at], codec)
        else:
            row[:] = 0
        if has_mask:
            at = b * ms[0] + h * ms[1] + (i0 + r) * ms[2] + j0 * ms[3]
            if ms[3] == 1:
                keep = mask[at:at + n]
                for c in range(n):
                    row[c] = row[c] if keep[c] else -np.inf
            elif not mask[at]:
                row[:] = -np.inf


@njit(fastmath=FASTMATH, cache=True)
def dropout_tile(drop, scale, b, h, i0, j0, x):
    """``x[r, c] *= scale`` where key ``j0 + c`` of row ``i0 + r`` (head h, batch b) survives dropout, else 0.

    ``drop`` is ``[seed_lo, seed_hi, threshold, batch offset]`` (uint64); the keep bits come from
    :mod:`fastattn._philox`, one call per four keys, the calls of a row in one loop of independent
    iterations (so LLVM can run them side by side in SIMD lanes).
    """
    lo, hi, t = drop[0], drop[1], drop[2]
    batch = np.uint64(b) + drop[3]
    n = x.shape[1]
    g0 = j0 // 4
    n_groups = (j0 + n + 3) // 4 - g0
    words = np.empty((4, n_groups), np.uint64)
    head = np.uint64(h)
    for r in range(x.shape[0]):
        i = np.uint64(i0 + r)
        for g in range(n_groups):
            w0, w1, w2, w3 = philox(np.uint64(g0 + g), i, head, batch, lo, hi)
            words[0, g] = w0
            words[1, g] = w1
            words[2, g] = w2
            words[3, g] = w3
        row = x[r]
        for c in range(n):
            j = j0 + c
            row[c] = row[c] * scale if words[j & 3, j // 4 - g0] >= t else row[c] * 0


@njit(fastmath=FASTMATH, cache=True)
def add_tile(dst, strides, b, h, i0, j0, src):
    """Add ``src [m, n]`` into the flat ``dst`` at rows ``i0 ...``, keys ``j0 ...`` of (b, h), in order.

    ``strides`` are ``dst``'s element strides over ``[B, Hq, Sq, Sk]``, 0 on the
    axes it sums over (so elements repeat, and are added one after the other).
    """
    n = src.shape[1]
    for r in range(src.shape[0]):
        at = b * strides[0] + h * strides[1] + (i0 + r) * strides[2] + j0 * strides[3]
        row = src[r]
        if strides[3] == 1:
            part = dst[at:at + n]
            for c in range(n):
                part[c] += row[c]
        else:  # the row sums into one element, in key order
            total = dst[at]
            for c in range(n):
                total += row[c]
            dst[at] = total


@njit(fastmath=FASTMATH, cache=True)
def grad_tile(s, dp, i0, period, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, extra, has_extra, lse, delta):
    """Scores -> probabilities in s and dP -> dS (pre-scale) in dp, in place.

    ``lse[r]`` and ``delta[r]`` belong to tile row ``r``.  With ``has_extra``
    the terms in ``extra`` are added as in :func:`softmax_tile`, and ``extra``
    is overwritten with the gradient of the scores after softcap (the bias's
    gradient; 0 where no key is seen).
    """
    m = s.shape[0]
    for r in range(m):
        i = i0 + r % period
        row_lse = lse[r]
        if row_lse == -np.inf:
            s[r] = 0
            dp[r] = 0
            if has_extra:
                extra[r] = 0
            continue
        p, c0 = _visible_part(s[r], i, j0, sq, sk, wl, wr)
        ds = _visible_part(dp[r], i, j0, sq, sk, wl, wr)[0]
        row_delta = delta[r]
        if has_extra and softcap <= 0 and not has_alibi:
            _grad_row_extra(p, ds, _visible_part(extra[r], i, j0, sq, sk, wl, wr)[0], row_lse, row_delta)
        elif softcap > 0 or has_alibi or has_extra:
            g = _visible_part(extra[r], i, j0, sq, sk, wl, wr)[0] if has_extra else p
            slope = slopes[r // period]
            for c in range(p.size):
                capped = softcap_fast(p[c], softcap)
                x = capped
                if has_alibi:
                    x += alibi_bias(slope, i, j0 + c0 + c, sq, sk)
                if has_extra:
                    x += g[c]
                e = exp_shifted(x, row_lse)
                p[c] = e
                d = e * (ds[c] - row_delta)
                if has_extra:
                    g[c] = d
                ds[c] = d * softcap_grad(capped, softcap)
        else:
            for c in range(p.size):
                e = exp_shifted(p[c], row_lse)
                p[c] = e
                ds[c] = e * (ds[c] - row_delta)


@njit(fastmath=FASTMATH, cache=True)
def _grad_row_extra(p, ds, g, row_lse, row_delta):
    """:func:`grad_tile` on one row with the extra terms ``g`` alone (no softcap, no ALiBi): vectorised."""
    for c in range(p.size):
        e = exp_shifted(p[c] + g[c], row_lse)
        p[c] = e
        d = e * (ds[c] - row_delta)
        g[c] = d
        ds[c] = d


@njit(fastmath=FASTMATH, cache=True)
def backward_buffers(rows, keys, dim, acc_t, has_extra):
    """The scratch arrays of :func:`key_tile_backward` for up to ``rows`` query rows and ``keys`` keys a
    tile, made once per task: a malloc per block of rows can cost page faults every time (with dask's
    ``MALLOC_TRIM_THRESHOLD_``, the backward ran 1.5x slower)."""
    return (np.empty((rows, dim), acc_t), np.empty((rows, dim), acc_t), np.empty(rows * keys, acc_t),
            np.empty(rows * keys, acc_t), np.empty(rows * keys if has_extra else 0, acc_t),
            np.empty((keys, dim), acc_t), np.empty((rows, dim), acc_t), np.empty(keys * dim, acc_t),
            np.empty(keys * dim, acc_t))


@njit(fastmath=FASTMATH, cache=True)
def key_tile_backward(dout, q, at_q, b, hk, group, kt, vt, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, extra,
                      dbias, dbias_strides, want_dbias, drop, drop_scale, lse, delta, scale, codec, block_q, dk_acc,
                      dv_acc, dq_part, want_dq, buffers, simd):
    """Add one tile of keys' contributions from every query head of KV head hk of sequence b.

    ``kt``/``vt`` are the tile's keys and values (from ``j0``, ``sk`` keys in all),
    ``dk_acc``/``dv_acc`` its gradient accumulators.  The sequence's ``sq``
    query rows are :func:`decode_tile` ``(q, a, h, r0 + i)`` with ``at_q = (a, r0)``
    (``dout`` alike; ``lse``, ``delta`` and ``dq_part`` are ``[B, H, S]`` and
    ``[B, H, S, D]`` indexed ``[a, h, r0 + i]``); with ``want_dq`` the (unscaled)
    dq contributions are added to ``dq_part``.  ``extra`` is
    :func:`extra_tile`'s tuple; with ``want_dbias`` the bias gradient is added
    into the flat ``dbias`` (element strides ``dbias_strides`` over
    ``[B, Hq, Sq, Sk]``, see :func:`add_tile`).  With ``drop_scale > 0`` the
    keep mask ``M`` of :func:`dropout_tile` (times ``drop_scale = 1 / (1 - p)``)
    is regenerated: ``dS = P (M dP - delta)`` and ``dV += (P M)^T dO``.
    ``buffers`` are :func:`backward_buffers` of at least ``block_q`` rows and
    the tile's keys, made once per task by the caller.  ``simd``: float32
    products on :mod:`._gemm`'s micro-kernels (else BLAS).
    FlashAttention-2's backward inner loop, shared by the dense, packed and
    paged kernels.
    """
    qa, r0 = at_q
    m_max = min(block_q, sq)
    n = kt.shape[0]
    has_extra = extra[3] or extra[6]
    q_buf, d_buf, s_buf, dp_buf, e_buf, key_buf, row_part, k_panels, v_panels = buffers
    key_part = key_buf[:n]  # BLAS's product before it is added to dk_acc or dv_acc
    pack_transposed(kt, k_panels, simd)
    pack_transposed(vt, v_panels, simd)
    i_lo, i_hi = query_range(j0, j0 + n, sq, sk, wl, wr)
    for h in range(hk * group, (hk + 1) * group):
        for i0 in range(i_lo, i_hi, m_max):
            m = min(m_max, i_hi - i0)
            qt = q_buf[:m]
            dt = d_buf[:m]
            decode_tile(q, qa, h, r0 + i0, m, qt, codec)
            decode_tile(dout, qa, h, r0 + i0, m, dt, codec)
            qt *= scale
            s = s_buf[:m * n].reshape(m, n)
            dp = dp_buf[:m * n].reshape(m, n)
            matmul_nt(qt, kt, k_panels, s, simd)
            matmul_nt(dt, vt, v_panels, dp, simd)
            e = e_buf[:m * n].reshape(m, n) if has_extra else s
            if has_extra:
                extra_tile(extra, b, h, i0, m, j0, n, e)
            if drop_scale > 0:
                dropout_tile(drop, drop_scale, b, h, i0, j0, dp)
            grad_tile(s, dp, i0, m, j0, sq, sk, wl, wr, softcap, slopes[b, h:h + 1], has_alibi, e, has_extra,
                      lse[qa, h, r0 + i0:r0 + i0 + m], delta[qa, h, r0 + i0:r0 + i0 + m])
            if drop_scale > 0:
                dropout_tile(drop, drop_scale, b, h, i0, j0, s)
            if want_dbias:
                add_tile(dbias, dbias_strides, b, h, i0, j0, e)
            add_matmul_tn(s, dt, dv_acc, key_part, simd)
            add_matmul_tn(dp, qt, dk_acc, key_part, simd)
            if want_dq:
                add_matmul(dp, kt, dq_part[qa, h, r0 + i0:r0 + i0 + m], row_part[:m], simd)


def no_dropout():
    """The ``drop`` array of a call without dropout (never read: its scale is 0)."""
    return np.zeros(4, np.uint64)


def no_extra(acc_dtype):
    """The :func:`extra_tile` tuple of a call without bias or mask (the same types as with them)."""
    none = np.zeros(4, np.int64)
    return np.zeros(1, acc_dtype), none, 0, False, np.ones(1, np.bool_), none, False
