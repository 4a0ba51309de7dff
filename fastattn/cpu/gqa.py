"""CPU kernels of the grouped-query attention family: repeat_kv and its backward.

The twin of :mod:`fastattn.cuda.gqa`.  The attention kernels never call these
(they read KV head ``h // group_size`` in place); they are for code that needs
the repeated heads as an array, e.g. to feed a kernel that has no GQA.

``repeat_kv`` copies bits: 16-bit dtypes travel as their uint16 view and are
never decoded.  ``repeat_kv_backward`` decodes each group of head rows into
float32 (float64 for float64), sums the group in a fixed order and rounds the
sum once into the input dtype, so the result is the same bits on every run.
"""
import numpy as np
from numba import njit, prange

from .._dtypes import accum_dtype, bits_view, codec_of
from ._fastmath import decode_rows, encode_row

_JIT = dict(parallel=True, cache=True, nogil=True)

#: Sequence rows summed per task by the backward: enough work per task, a small buffer.
_ROWS = 64


@njit(**_JIT)
def _repeat(kv, group_size, out):
    """out[b, h] = kv[b, h // group_size]: one task per input row, copied into its group."""
    batch, heads_kv, seq, dim = kv.shape
    for task in prange(batch * heads_kv * seq):
        s = task % seq
        hk = (task // seq) % heads_kv
        b = task // (seq * heads_kv)
        src = kv[b, hk, s]
        for g in range(group_size):
            dst = out[b, hk * group_size + g, s]
            for d in range(dim):
                dst[d] = src[d]


@njit(**_JIT)
def _sum_groups(dheads, group_size, codec, acc_t, out, rows):
    """out[b, hk] = sum over g of dheads[b, hk * group_size + g], accumulated in acc_t."""
    batch, heads_kv, seq, dim = out.shape
    n_tiles = (seq + rows - 1) // rows
    for task in prange(batch * heads_kv * n_tiles):
        tile = task % n_tiles
        hk = (task // n_tiles) % heads_kv
        b = task // (n_tiles * heads_kv)
        s0 = tile * rows
        m = min(rows, seq - s0)
        total = np.zeros((m, dim), acc_t)
        part = np.empty((m, dim), acc_t)
        for g in range(group_size):
            decode_rows(dheads[b, hk * group_size + g, s0:s0 + m], part, codec)
            total += part
        for r in range(m):
            encode_row(total[r], out[b, hk, s0 + r], codec)


def _batched(x):
    """A 4-d view: [B, H, S, D] as it is, [H, S, D] with a leading batch of 1."""
    return x if x.ndim == 4 else x[None]


def _heads_shape(shape, heads):
    return tuple(shape[:-3]) + (heads,) + tuple(shape[-2:])


def repeat_kv(kv, group_size):
    """:func:`fastattn.repeat_kv` on a NumPy array (``[B, Hkv, S, D]`` or ``[Hkv, S, D]``)."""
    out = np.empty(_heads_shape(kv.shape, kv.shape[-3] * group_size), kv.dtype)
    if out.size:
        _repeat(_batched(bits_view(kv)), group_size, _batched(bits_view(out)))
    return out


def repeat_kv_backward(dkv, group_size):
    """:func:`fastattn.repeat_kv_backward` on a NumPy array (``[B, Hq, S, D]`` or ``[Hq, S, D]``)."""
    out = np.empty(_heads_shape(dkv.shape, dkv.shape[-3] // group_size), dkv.dtype)
    if out.size:
        acc_t = np.float64 if accum_dtype(dkv.dtype) == np.float64 else np.float32
        _sum_groups(_batched(bits_view(dkv)), group_size, codec_of(dkv.dtype), acc_t,
                    _batched(bits_view(out)), _ROWS)
    return out
