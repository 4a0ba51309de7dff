"""CUDA kernel of the rotary family: rotate the leading features of every row by its position.

The twin of :mod:`fastattn.cpu.rotary`.  One thread per output element, rows
of ``D`` consecutive threads (reads and writes coalesced): the thread of
feature ``d`` reads its partner in the pair (``d ± rotary_dim / 2``, or
``d ^ 1`` interleaved), turns the pair by ``cos``/``sin`` of the row's
position in float32 (float64 for float64) and writes its own element; a
feature past ``rotary_dim`` is copied.
"""
import numpy as np
from numba import cuda, int64, uint64

from .._config import config
from . import _device, _launch

_kernels = {}


def _make_rotate(dtype):
    load, store = _device.codec(dtype)
    acc = _device.acc_type(dtype)

    def rotate_kernel(x, cos, sin, positions, pos_stride, seq, interleaved, sign, out):
        """``x``/``out`` ``[rows, D]`` (row ``(b * H + h) * S + s``), ``positions`` flat ``[B or 1, S]``."""
        e = cuda.grid(1)
        rows, dim = x.shape
        if e >= rows * dim:
            return
        r = e // dim
        d = e - r * dim
        half = cos.shape[1]
        if d >= 2 * half:
            out[uint64(r), uint64(d)] = x[uint64(r), uint64(d)]
            return
        s = r % seq
        b = r // seq  # b * H + h: the batch is b // H, folded into pos_stride
        p = positions[uint64(b * pos_stride + s)]
        if interleaved:
            i = d // 2
            mine = load(x[uint64(r), uint64(d)])
            other = load(x[uint64(r), uint64(d ^ 1)])
            turn = -other if d % 2 == 0 else other
        else:
            i = d if d < half else d - half
            mine = load(x[uint64(r), uint64(d)])
            other = load(x[uint64(r), uint64(d + half if d < half else d - half)])
            turn = -other if d < half else other
        out[uint64(r), uint64(d)] = store(mine * cos[p, i] + sign * turn * sin[p, i])

    return rotate_kernel


def _kernel(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _kernels:
        _kernels[dtype] = cuda.jit(_make_rotate(dtype))
    return _kernels[dtype]


def rotate(x, cos, sin, positions, spec, sign):
    """``x`` rotated by the positions' angles (``sign=-1``: by their opposites); a new device array."""
    out = _launch.empty(tuple(x.shape), spec.dtype)
    n = spec.batch * spec.heads * spec.seq * spec.head_dim
    if n == 0:
        return out
    acc = np.dtype(spec.accum_dtype)
    tables = [t if np.dtype(t.dtype) == acc and t.is_c_contiguous() else
              _launch.to_device(t.copy_to_host().astype(acc)) for t in (cos, sin)]
    # rows are (b * H + h) * S + s; per-batch positions sit at b * S: the row's b * H + h divided by H
    per_batch = positions.shape[0] > 1
    pos = np.repeat(positions, spec.heads, axis=0) if per_batch else positions
    threads = config.cuda_threads
    _kernel(spec.dtype)[_launch.blocks(n, threads), threads](
        _launch.rows(x), *tables, _launch.to_device(pos.reshape(-1)), spec.seq if per_batch else 0, spec.seq,
        spec.interleaved, acc.type(sign), _launch.rows(out))
    return out


def variants(head_dims=None):
    """The rotary kernel in every dtype (for ``cuda-report``); no head-dim buckets."""
    from numba import boolean

    from .._dtypes import dtype_named

    out = []
    for name in ("float32", "float64", "float16", "bfloat16"):
        dtype = dtype_named(name)
        acc = _device.acc_type(dtype)
        x2 = _device.element_type(dtype)[:, ::1]
        sig = (x2, acc[:, ::1], acc[:, ::1], int64[::1], int64, int64, boolean, acc, x2)
        out.append(_launch.Variant("rotary", "other", name, 0, config.cuda_threads, _make_rotate(dtype), sig))
    return out


def unrotate(x, rotary):
    """``x [B, H, S, D]`` turned back by a :class:`~fastattn._validate.RotaryPlan` (a fused backward's step)."""
    from .._validate import RotarySpec

    b, h, s, d = (int(n) for n in x.shape)
    spec = RotarySpec(b, h, s, d, int(rotary.cos.shape[1]), int(rotary.cos.shape[0]), np.dtype(x.dtype),
                      rotary.interleaved)
    return rotate(x, rotary.cos, rotary.sin, rotary.positions, spec, -1)


def apply(x, rotary):
    """``x [B, H, S, D]`` turned by a :class:`~fastattn._validate.RotaryPlan` (the fused projection's step)."""
    from .._validate import RotarySpec

    b, h, s, d = (int(n) for n in x.shape)
    spec = RotarySpec(b, h, s, d, int(rotary.cos.shape[1]), int(rotary.cos.shape[0]), np.dtype(x.dtype),
                      rotary.interleaved)
    return rotate(x, rotary.cos, rotary.sin, rotary.positions, spec, 1)
