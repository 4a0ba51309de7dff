"""CUDA kernels of the grouped-query attention family: repeat_kv and its backward.

The twin of :mod:`fastattn.cpu.gqa`.  One thread per output element,
``config.cuda_threads`` threads per block.  ``repeat_kv`` copies bits (16-bit
dtypes travel as their uint16 view); ``repeat_kv_backward`` widens each of the
``group_size`` terms, sums them in float32 (float64 for float64) in a fixed
order, and narrows the sum once into the input dtype.
"""
import numpy as np
from numba import cuda

from .._config import config
from . import _device, _launch

_kernels = {}


@_device.inline
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


def _make_sum_groups(dtype):
    load, store = _device.codec(dtype)
    zero = _device.acc_type(dtype)(0.0)

    def sum_groups(dheads, group_size, out):
        e = cuda.grid(1)
        if e < out.size:
            b, hk, s, d = _coords(e, out.shape)
            total = zero
            for g in range(group_size):
                total += load(dheads[b, hk * group_size + g, s, d])
            out[b, hk, s, d] = store(total)

    return sum_groups


def _sum_groups(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _kernels:
        _kernels[dtype] = cuda.jit(_make_sum_groups(dtype))
    return _kernels[dtype]


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
    threads = config.cuda_threads
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
        _launch_1d(_sum_groups(dkv.dtype), out.size, _batched(_launch.kernel_view(dkv)), group_size,
                   _batched(_launch.kernel_view(out)))
    return out


def variants(head_dims=None):
    """The kernels of this family in every dtype (for ``cuda-report``); they have no head-dim buckets."""
    from numba import int64

    from .._dtypes import dtype_named

    out = []
    for name in ("float32", "float64", "float16", "bfloat16"):
        dtype = dtype_named(name)
        x4 = _device.element_type(dtype)[:, :, :, ::1]
        out.append(_launch.Variant("repeat_kv_backward", "backward", name, 0, config.cuda_threads,
                                   _make_sum_groups(dtype), (x4, int64, x4)))
        out.append(_launch.Variant("repeat_kv", "other", name, 0, config.cuda_threads, _repeat.py_func,
                                   (x4, int64, x4)))
    return out
