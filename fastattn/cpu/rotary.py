"""CPU kernel of the rotary family: rotate the leading features of every row by its position.

The twin of :mod:`fastattn.cuda.rotary`.  One task per (batch, head, block of
rows): the rows are decoded into float32 (float64) in a buffer, their pairs
turned by ``cos``/``sin`` of the row's position (``sign`` -1 turns them back:
the backward), and encoded once into the output dtype.
"""
import numpy as np
from numba import njit, prange

from .._dtypes import bits_view
from ._fastmath import FASTMATH, decode_rows, encode_row

_ROWS = 64


@njit(inline="always", fastmath=FASTMATH)
def rotate_row(row, c, s, interleaved, sign):
    """Turn the pairs of ``row``'s first ``2 * c.size`` features in place by the angles of ``c``/``s``
    (``sign=-1``: by their opposites): ``(u, v) -> (u c - v s, v c + u s)``."""
    half = c.size
    if interleaved:
        for i in range(half):
            u, v = row[2 * i], row[2 * i + 1]
            row[2 * i] = u * c[i] - sign * v * s[i]
            row[2 * i + 1] = v * c[i] + sign * u * s[i]
    else:
        for i in range(half):
            u, v = row[i], row[i + half]
            row[i] = u * c[i] - sign * v * s[i]
            row[i + half] = v * c[i] + sign * u * s[i]


@njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
def _rotate(x, cos, sin, positions, interleaved, sign, codec, out):
    batch, heads, seq, dim = x.shape
    n_blocks = (seq + _ROWS - 1) // _ROWS
    for task in prange(batch * heads * n_blocks):
        block = task % n_blocks
        h = (task // n_blocks) % heads
        b = task // (n_blocks * heads)
        s0 = block * _ROWS
        m = min(_ROWS, seq - s0)
        rows = np.empty((m, dim), cos.dtype)
        decode_rows(x[b, h, s0:s0 + m], rows, codec)
        at = positions[b if positions.shape[0] > 1 else 0]
        for r in range(m):
            p = at[s0 + r]
            rotate_row(rows[r], cos[p], sin[p], interleaved, sign)
            encode_row(rows[r], out[b, h, s0 + r], codec)


def rotate(x, cos, sin, positions, spec, sign):
    """``x`` rotated by the positions' angles (``sign=-1``: by their opposites); a new array."""
    out = np.empty(x.shape, spec.dtype)
    if out.size == 0:
        return out
    acc = spec.accum_dtype
    _rotate(bits_view(np.ascontiguousarray(x)), np.ascontiguousarray(cos, acc), np.ascontiguousarray(sin, acc),
            positions, spec.interleaved, acc.type(sign), spec.codec, bits_view(out))
    return out


def plan(rotary, spec_dtype):
    """``(cos, sin, positions, interleaved)`` of a :class:`~fastattn._validate.RotaryPlan` as the fused
    kernels take them (tables in accumulation precision), or one-element stand-ins without rotary."""
    from .._dtypes import accum_dtype

    acc = accum_dtype(spec_dtype)
    if rotary is None:
        return np.ones((1, 1), acc), np.zeros((1, 1), acc), np.zeros((1, 1), np.int64), False
    return (np.ascontiguousarray(rotary.cos, acc), np.ascontiguousarray(rotary.sin, acc), rotary.positions,
            rotary.interleaved)

