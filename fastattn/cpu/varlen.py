"""CPU plumbing of packed variable-length attention: views of one sequence and writes back.

The twin of :mod:`fastattn.cuda.varlen`.  A packed ``[total, H, D]`` array's
rows ``start:stop`` are one sequence; seen as ``[1, H, S, D]`` (a strided
view, no copy) they go to the dense kernels, whose results are written back
into the packed outputs.
"""
import numpy as np

from .._dtypes import accum_dtype


def heads_view(x, start, stop):
    """Rows ``start:stop`` of a packed ``[total, H, D]`` array as a ``[1, H, S, D]`` view."""
    return x[start:stop].transpose(1, 0, 2)[None]


def zeros(shape, dtype):
    return np.zeros(shape, dtype)


def lse_zeros(heads, total, dtype):
    """``[H, total]`` lse of the packed rows: -inf (no key seen) until written."""
    return np.full((heads, total), -np.inf, accum_dtype(dtype))


def put_rows(dst, start, src):
    """``dst[start:start + S, h, d] = src[0, h, s, d]``."""
    dst[start:start + src.shape[2]] = src[0].transpose(1, 0, 2)


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
