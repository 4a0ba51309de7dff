"""CPU kernels of packed variable-length attention: the dense kernels on the packed arrays.

The twin of :mod:`fastattn.cuda.varlen`.  Sequence ``b`` of a packed
``[total, H, D]`` array is rows ``cu[b]:cu[b + 1]``, read in place: a head's
tile of rows is strided, and the tile functions copy it into their buffers
(which they do anyway for the query tiles; for key tiles it costs one copy per
task, small beside the tile's GEMMs).  The forward runs every sequence's query
tiles, and the backward every sequence's key tiles, in one parallel loop of
the dense kernels' tile functions, writing the packed outputs in place.
"""
import numpy as np

from .._config import config
from .._dtypes import bits_view
from . import attention as dense
from ._blas import single_threaded_blas
from ._gemm import simd_gemm


def _packed(*arrays):
    """The kernels' views of packed arrays: their bits, C-contiguous (a copy only if the caller's is not)."""
    return [bits_view(np.ascontiguousarray(x)) for x in arrays]


def _tiles(cu_q, block_q):
    """``(sequence, first row)`` of every query tile of the batch, longest sequences first."""
    lens = np.diff(cu_q)
    order = np.argsort(-lens, kind="stable")
    return np.array([(b, i0) for b in order for i0 in range(0, int(lens[b]), block_q)], np.int64).reshape(-1, 2)


def forward(q, k, v, cu_q, cu_k, slopes, spec, extra, dropout=None):
    """``(out [total_q, Hq, D], lse [Hq, total_q])`` of a packed batch; one parallel loop for all sequences."""
    out = np.empty(q.shape, spec.dtype)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf, spec.accum_dtype)
    tiles = _tiles(cu_q, config.cpu_block_q)
    if tiles.shape[0] == 0 or out.size == 0:
        return out, lse
    slopes, has_alibi = dense._slopes(slopes, spec)
    with single_threaded_blas():
        dense._forward_packed(*_packed(q, k, v), cu_q, cu_k, tiles, spec.codec,
                              spec.scale, spec.window_left, spec.window_right, spec.softcap, slopes, has_alibi,
                              dense._extra(extra, spec), *dense.dropout_args(dropout, np.dtype(spec.accum_dtype)),
                              bits_view(out), lse, config.cpu_block_q, config.cpu_block_k, simd_gemm())
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, slopes, spec, extra, want_dbias, dropout=None):
    """``(dq, dk, dv, dbias)`` of a packed batch: the dense backward kernels on the packed arrays, every
    sequence's key tiles in one parallel loop, gradients written packed (dbias: accumulation dtype)."""
    dq, dk, dv = (np.zeros(x.shape, spec.dtype) for x in (q, k, k))
    want_dbias = bool(want_dbias and extra.bias is not None)
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    seqs = np.stack([np.zeros_like(cu_q[:-1]), cu_q[:-1], np.zeros_like(cu_k[:-1]), cu_k[:-1], lens_q, lens_k],
                    axis=1).astype(np.int64)
    if dq.size == 0 or dk.size == 0:
        return dq, dk, dv, (np.zeros(extra.bias_shape, spec.accum_dtype) if want_dbias else None)
    dh, qh, kh, vh, oh = _packed(dout, q, k, v, out)
    dbias = dense.run_backward((dh, oh), qh, kh, vh, np.ascontiguousarray(lse)[None], seqs, slopes, spec, extra,
                               want_dbias, bits_view(dq), bits_view(dk), bits_view(dv), dropout)
    return dq, dk, dv, (None if dbias is None else dbias.reshape(extra.bias_shape))
