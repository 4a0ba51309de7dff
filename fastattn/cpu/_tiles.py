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

from .._tile import alibi_bias, key_range, query_range, softcap_grad
from ._fastmath import FASTMATH, decode_rows, exp_row, exp_shifted, max_of, softcap_fast


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
def softmax_tile(s, i0, period, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, row_max, row_sum, acc):
    """Turn a tile of raw scores into exp(score - running max), updating the running state.

    ``row_max``, ``row_sum`` and the rows of the output accumulator ``acc`` are
    rescaled when a row's maximum grows; the caller then adds ``s @ v``.
    """
    m = s.shape[0]
    for r in range(m):
        i = i0 + r % period
        seen, c0 = _visible_part(s[r], i, j0, sq, sk, wl, wr)
        if seen.size == 0:
            continue
        if softcap > 0 or has_alibi:
            _transform_scores(seen, i, j0 + c0, sq, sk, softcap, slopes[r // period], has_alibi)
        new_max = max(row_max[r], max_of(seen))
        alpha = _rescale(row_max[r], new_max, row_sum[r] * 0)
        total = exp_row(seen, new_max)
        row_sum[r] = row_sum[r] * alpha + total
        row_max[r] = new_max
        if alpha != 1.0:
            acc_row = acc[r]
            for d in range(acc_row.size):
                acc_row[d] *= alpha


@njit(fastmath=FASTMATH, cache=True)
def _transform_scores(seen, i, j, sq, sk, softcap, slope, has_alibi):
    """softcap then ALiBi on the visible scores of row i, which start at key j."""
    for c in range(seen.size):
        x = softcap_fast(seen[c], softcap)
        if has_alibi:
            x += alibi_bias(slope, i, j + c, sq, sk)
        seen[c] = x


@njit(fastmath=FASTMATH, cache=True)
def grad_tile(s, dp, i0, period, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, lse, delta):
    """Scores -> probabilities in s and dP -> dS (pre-scale) in dp, in place.

    ``lse[r]`` and ``delta[r]`` belong to tile row ``r``.
    """
    m = s.shape[0]
    for r in range(m):
        i = i0 + r % period
        row_lse = lse[r]
        if row_lse == -np.inf:
            s[r] = 0
            dp[r] = 0
            continue
        p, c0 = _visible_part(s[r], i, j0, sq, sk, wl, wr)
        ds = _visible_part(dp[r], i, j0, sq, sk, wl, wr)[0]
        row_delta = delta[r]
        if softcap > 0 or has_alibi:
            slope = slopes[r // period]
            for c in range(p.size):
                capped = softcap_fast(p[c], softcap)
                x = capped
                if has_alibi:
                    x += alibi_bias(slope, i, j0 + c0 + c, sq, sk)
                e = exp_shifted(x, row_lse)
                p[c] = e
                ds[c] = e * (ds[c] - row_delta) * softcap_grad(capped, softcap)
        else:
            for c in range(p.size):
                e = exp_shifted(p[c], row_lse)
                p[c] = e
                ds[c] = e * (ds[c] - row_delta)


@njit(fastmath=FASTMATH, cache=True)
def key_tile_backward(dout, q, b, hk, group, kt, vt, j0, sq, sk, wl, wr, softcap, slopes, has_alibi, lse,
                      delta, scale, codec, block_q, dk_acc, dv_acc, dq_part, want_dq):
    """Add one tile of keys' contributions from every query head of KV head hk of sequence b.

    ``kt``/``vt`` are the tile's keys and values (from ``j0``, ``sk`` keys in all),
    ``dk_acc``/``dv_acc`` its gradient accumulators; with ``want_dq`` the
    (unscaled) dq contributions are added to ``dq_part[b, h]``.  FlashAttention-2's
    backward inner loop, shared by the dense and the paged kernels.
    """
    m_max = min(block_q, sq)
    dim = kt.shape[1]
    acc_t = dk_acc.dtype
    i_lo, i_hi = query_range(j0, j0 + kt.shape[0], sq, sk, wl, wr)
    for h in range(hk * group, (hk + 1) * group):
        for i0 in range(i_lo, i_hi, m_max):
            m = min(m_max, i_hi - i0)
            qt = np.empty((m, dim), acc_t)
            dt = np.empty((m, dim), acc_t)
            decode_rows(q[b, h, i0:i0 + m], qt, codec)
            decode_rows(dout[b, h, i0:i0 + m], dt, codec)
            qt *= scale
            s = np.dot(qt, kt.T)
            dp = np.dot(dt, vt.T)
            grad_tile(s, dp, i0, m, j0, sq, sk, wl, wr, softcap, slopes[b, h:h + 1], has_alibi,
                      lse[b, h, i0:i0 + m], delta[b, h, i0:i0 + m])
            dv_acc += np.dot(s.T, dt)
            dk_acc += np.dot(dp.T, qt)
            if want_dq:
                dq_part[b, h, i0:i0 + m] += np.dot(dp, kt)
