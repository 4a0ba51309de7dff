"""CUDA kernels of the grouped-query attention family: repeat_kv and its backward.

The twin of :mod:`fastattn.cpu.gqa`.  One thread per output element,
``config.cuda_block_q`` threads per block.  ``repeat_kv`` copies bits (16-bit
dtypes travel as their uint16 view); ``repeat_kv_backward`` widens each of the
``group_size`` terms, sums them in float32 (float64 for float64) in a fixed
order, and narrows the sum once into the input dtype.
"""
import numpy as np
from numba import cuda, float32, float64

from .._config import config
from .._dtypes import accum_dtype, codec_of, narrow, widen
from . import _launch

_kernels = {}


@cuda.jit(device=True)
def _coords(e, shape):
    """(b, h, s, d) of flat element e of a C-ordered [B, H, S, D] array."""
    heads, seq, dim = shape[1], shape[2], shape[3]
    return e // (dim * seq * heads), (e // (dim * seq)) % heads, (e // dim) % seq, e % dim


@cuda.jit
def _repeat(kv, group_size, out):
    e = cuda.grid(1)
    if e < out.size:
        b, h, s, d = _coords(e, out.shape)
        out[b, h, s, d] = kv[b, h // group_size, s, d]


def _make_sum_groups(acc):
    @cuda.jit
    def sum_groups(dheads, group_size, codec, out):
        e = cuda.grid(1)
        if e < out.size:
            b, hk, s, d = _coords(e, out.shape)
            total = acc(0.0)
            for g in range(group_size):
                total += acc(widen(dheads[b, hk * group_size + g, s, d], codec))
            out[b, hk, s, d] = narrow(total, codec)

    return sum_groups


def _sum_groups(acc):
    if acc not in _kernels:
        _kernels[acc] = _make_sum_groups(acc)
    return _kernels[acc]


class _Strided:
    """``__cuda_array_interface__`` of the same memory under another shape and strides."""

    def __init__(self, x, shape, strides):
        self.__cuda_array_interface__ = dict(x.__cuda_array_interface__, shape=shape, strides=strides)


def _batched(x):
    """A 4-d view: [B, H, S, D] as it is, [H, S, D] with a leading batch of 1 (any strides)."""
    shape = tuple(x.shape)
    if len(shape) == 4:
        return x
    try:
        return x.reshape((1,) + shape)
    except NotImplementedError:  # numba reshapes only contiguous arrays; describe the view by hand
        return cuda.as_cuda_array(_Strided(x, (1,) + shape, (0,) + tuple(x.strides)))


def _heads_shape(shape, heads):
    shape = tuple(shape)
    return shape[:-3] + (heads,) + shape[-2:]


def _launch_1d(kernel, n, *args):
    threads = config.cuda_block_q
    kernel[_launch.blocks(n, threads), threads](*args)


def repeat_kv(kv, group_size):
    """:func:`fastattn.repeat_kv` on a device array (``[B, Hkv, S, D]`` or ``[Hkv, S, D]``)."""
    out = _launch.empty(_heads_shape(kv.shape, tuple(kv.shape)[-3] * group_size), kv.dtype)
    if out.size:
        _launch_1d(_repeat, out.size, _batched(_launch.kernel_view(kv)), group_size,
                   _batched(_launch.kernel_view(out)))
    return out


def repeat_kv_backward(dkv, group_size):
    """:func:`fastattn.repeat_kv_backward` on a device array (``[B, Hq, S, D]`` or ``[Hq, S, D]``)."""
    out = _launch.empty(_heads_shape(dkv.shape, tuple(dkv.shape)[-3] // group_size), dkv.dtype)
    if out.size:
        acc = float64 if accum_dtype(dkv.dtype) == np.float64 else float32
        _launch_1d(_sum_groups(acc), out.size, _batched(_launch.kernel_view(dkv)), group_size,
                   codec_of(dkv.dtype), _batched(_launch.kernel_view(out)))
    return out
