"""CUDA plumbing of packed variable-length attention: views of one sequence and writes back.

The twin of :mod:`fastattn.cpu.varlen`.  Rows ``start:stop`` of a packed
``[total, H, D]`` device array are described as a strided ``[1, H, S, D]``
view (no copy); results go back into the packed outputs with the strided
4-d copy kernel of :mod:`fastattn.cuda._launch`.
"""
import numpy as np
from numba import config, cuda

from .._dtypes import accum_dtype
from . import _launch
from .gqa import _Strided


def _view(x, shape, strides):
    """The memory of device array ``x`` under another shape and strides (bytes), no copy."""
    if config.ENABLE_CUDASIM:  # the simulator's arrays are NumPy arrays inside, with no CUDA interface
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.lib.stride_tricks.as_strided(x._ary, tuple(shape), tuple(strides)))
    return cuda.as_cuda_array(_Strided(x, tuple(shape), tuple(strides)))


def heads_view(x, start, stop):
    """Rows ``start:stop`` of a packed ``[total, H, D]`` array as a ``[1, H, S, D]`` view."""
    part = x[start:stop]
    s, h, d = (int(n) for n in part.shape)
    rs, hs, ds = part.strides
    return _view(part, (1, h, s, d), (0, hs, rs, ds))


def zeros(shape, dtype):
    out = _launch.empty(tuple(shape), dtype)
    if out.size:
        flat = _launch.flat(_launch.kernel_view(out))
        flat[:] = 0
    return out


def lse_zeros(heads, total, dtype):
    """``[H, total]`` lse of the packed rows: -inf (no key seen) until written."""
    return cuda.to_device(np.full((heads, total), -np.inf, accum_dtype(dtype)))


def _copy(src, dst):
    if dst.size:
        _launch._copy4[_launch.blocks(dst.size, 256), 256](src, dst)


@cuda.jit
def _add4(src, dst):
    e = cuda.grid(1)
    shape = dst.shape
    if e < dst.size:
        d = e % shape[3]
        s = (e // shape[3]) % shape[2]
        h = (e // (shape[3] * shape[2])) % shape[1]
        b = e // (shape[3] * shape[2] * shape[1])
        dst[b, h, s, d] += src[b, h, s, d]


def add_into(dst, src):
    """``dst += src`` for 4-d device arrays of one shape (a sequence's bias gradient into its corner)."""
    if dst.size:
        _add4[_launch.blocks(dst.size, 256), 256](src, dst)


def put_rows(dst, start, src):
    """``dst[start:start + S, h, d] = src[0, h, s, d]``."""
    _copy(_launch.kernel_view(src), _launch.kernel_view(heads_view(dst, start, start + int(src.shape[2]))))


def put_lse(dst, start, src):
    """``dst[h, start + s] = src[0, h, s]``."""
    h, s = int(src.shape[1]), int(src.shape[2])
    part = dst[:, start:start + s]
    _copy(src.reshape(1, 1, h, s), _view(part, (1, 1, h, s), (0, 0) + tuple(part.strides)))


def lse_view(lse, start, stop):
    """``lse[:, start:stop]`` as a contiguous ``[1, H, S]`` copy (the backward reads it flat)."""
    part = lse[:, start:stop]
    h, s = (int(n) for n in part.shape)
    return _launch.contiguous(_view(part, (1, 1, h, s), (0, 0) + tuple(part.strides))).reshape(1, h, s)


def row(x, i):
    """Row ``i`` of a 2-d array (per-sequence ALiBi slopes); a 1-d array as it is."""
    return x[i] if x is not None and len(x.shape) == 2 else x
