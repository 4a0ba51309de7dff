"""CPU plumbing of packed variable-length attention: one sequence in and out of the packed layout.

The twin of :mod:`fastattn.cuda.varlen`.  A packed ``[total, H, D]`` array's
rows ``start:stop`` are one sequence; copied head-major into ``[1, H, S, D]``
(on every core, bits as they are) they go to the dense kernels, whose results
are copied back into the packed outputs the same way.
"""
import numpy as np
from numba import njit, prange

from .._dtypes import accum_dtype, bits_view

_JIT = dict(parallel=True, cache=True, nogil=True)


@njit(**_JIT)
def _gather(src, start, dst):
    """dst [1, H, S, D] = src [start:start + S, H, D], transposed (bits)."""
    heads, seq = dst.shape[1], dst.shape[2]
    for task in prange(heads * seq):
        h = task // seq
        s = task - h * seq
        dst[0, h, s, :] = src[start + s, h, :]


@njit(**_JIT)
def _scatter(src, start, dst):
    """dst [start:start + S, H, D] = src [1, H, S, D], transposed (bits)."""
    heads, seq = src.shape[1], src.shape[2]
    for s in prange(seq):
        for h in range(heads):
            dst[start + s, h, :] = src[0, h, s, :]


def heads_view(x, start, stop):
    """Rows ``start:stop`` of a packed ``[total, H, D]`` array as a ``[1, H, S, D]`` array (a copy)."""
    out = np.empty((1, x.shape[1], stop - start, x.shape[2]), x.dtype)
    if out.size:
        _gather(bits_view(np.ascontiguousarray(x)), start, bits_view(out))
    return out


def zeros(shape, dtype):
    return np.zeros(shape, dtype)


def lse_zeros(heads, total, dtype):
    """``[H, total]`` lse of the packed rows: -inf (no key seen) until written."""
    return np.full((heads, total), -np.inf, accum_dtype(dtype))


def put_rows(dst, start, src):
    """``dst[start:start + S, h, d] = src[0, h, s, d]``."""
    if src.size:
        _scatter(bits_view(np.ascontiguousarray(src)), start, bits_view(dst))


def put_lse(dst, start, src):
    """``dst[h, start + s] = src[0, h, s]``."""
    dst[:, start:start + src.shape[2]] = src[0]


def lse_view(lse, start, stop):
    """``lse[:, start:stop]`` as ``[1, H, S]``."""
    return lse[:, start:stop][None]


def row(x, i):
    """Row ``i`` of a 2-d array (per-sequence ALiBi slopes); a 1-d array as it is."""
    if x is None:
        return None
    x = np.asarray(x)
    return x[i] if x.ndim == 2 else x


def add_into(dst, src):
    """``dst += src`` (a sequence's bias gradient into its corner of the batch's)."""
    dst += src
