"""CUDA kernels of packed variable-length attention: the dense kernels on each sequence's views.

The twin of :mod:`fastattn.cpu.varlen`.  Rows ``start:stop`` of a packed
``[total, H, D]`` device array are described as a strided ``[1, H, S, D]``
view (no copy), each sequence is one launch of the dense kernels, and the
results go back into the packed outputs with the strided 4-d copy kernel of
:mod:`fastattn.cuda._launch`.
"""
import numpy as np
from numba import config, cuda

from .._dtypes import accum_dtype
from .._validate import corner, sequence_args
from . import _launch
from . import attention as dense
from .gqa import _Strided


def forward(q, k, v, cu_q, cu_k, slopes, spec, extra, dropout=None):
    """``(out [total_q, Hq, D], lse [Hq, total_q])`` of a packed batch, one dense launch per sequence."""
    out = zeros(tuple(q.shape), q.dtype)
    lse = lse_zeros(int(q.shape[1]), int(q.shape[0]), q.dtype)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            continue
        seq_spec, part, seq_slopes = sequence_args(spec, extra, slopes, b, q1 - q0, k1 - k0)
        o, l = dense.forward(heads_view(q, q0, q1), heads_view(k, k0, k1), heads_view(v, k0, k1), seq_slopes,
                             seq_spec, part, dropout, batch_offset=b)
        put_rows(out, q0, o)
        put_lse(lse, q0, l)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, slopes, spec, extra, want_dbias, dropout=None):
    """``(dq, dk, dv, dbias)`` of a packed batch, one dense backward per sequence (dbias: accumulation dtype)."""
    dq, dk, dv = (zeros(tuple(x.shape), q.dtype) for x in (q, k, v))
    want_dbias = bool(want_dbias and extra.bias is not None)
    dbias = zeros(tuple(extra.bias.shape), accum_dtype(q.dtype)) if want_dbias else None
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0 or k1 == k0:
            continue
        seq_spec, part, seq_slopes = sequence_args(spec, extra, slopes, b, q1 - q0, k1 - k0)
        rows = [heads_view(x, q0, q1) for x in (dout, q)]
        keys = [heads_view(x, k0, k1) for x in (k, v)]
        grads = dense.backward(*rows, *keys, heads_view(out, q0, q1), lse_view(lse, q0, q1), seq_slopes, seq_spec,
                               part, want_dbias, dropout, batch_offset=b)
        for dst, start, grad in zip((dq, dk, dv), (q0, k0, k0), grads):
            put_rows(dst, start, grad)
        if want_dbias:  # sequences sharing a broadcast batch axis add up, in batch order
            add_into(corner(dbias, b, q1 - q0, k1 - k0), grads[3].reshape(tuple(part.bias.shape)))
    if want_dbias:
        dbias = dbias.reshape(extra.bias_shape) if extra.bias_shape else dbias.reshape(())
    return dq, dk, dv, dbias


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
        _launch._copy4[_launch.blocks(dst.size, 256), 256](src, dst, False)


def add_into(dst, src):
    """``dst += src`` for 4-d device arrays of one shape (a sequence's bias gradient into its corner)."""
    if dst.size:
        _launch._copy4[_launch.blocks(dst.size, 256), 256](src, dst, True)


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

