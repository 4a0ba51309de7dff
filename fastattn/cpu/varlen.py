"""CPU kernels of packed variable-length attention: the dense kernels on views of the packed arrays.

The twin of :mod:`fastattn.cuda.varlen`.  Sequence ``b`` of a packed
``[total, H, D]`` array is rows ``cu[b]:cu[b + 1]``, read in place.  The
inputs are copied head-major once (``[1, H, total, D]``, into reused scratch
memory) so that a head's tile of rows is contiguous; then the forward runs
every sequence's query tiles, and the backward every sequence's key tiles,
in one parallel loop of the dense kernels' tile functions, writing the packed
outputs in place.
"""
import numpy as np
from numba import njit, prange

from .._config import config
from .._dtypes import bits_view
from . import attention as dense
from ._blas import single_threaded_blas
from ._scratch import scratch


@njit(parallel=True, cache=True, nogil=True)
def _head_major(src, dst, chunk):
    """``dst[0, h, r] = src[r, h]``: a packed ``[total, H, D]`` array as ``[1, H, total, D]`` (bits)."""
    total, heads, dim = src.shape
    n_chunks = (total + chunk - 1) // chunk
    for task in prange(heads * n_chunks):
        h = task // n_chunks
        r0 = (task - h * n_chunks) * chunk
        for r in range(r0, min(total, r0 + chunk)):
            for d in range(dim):
                dst[0, h, r, d] = src[r, h, d]


def head_major(x, slot=None):
    """A packed array's bits, head-major ``[1, H, total, D]`` (one parallel copy: tiles of a head's rows are
    then contiguous, which the kernels' GEMMs read in place).  With ``slot``, in this thread's scratch
    memory of that name (valid until the next call with the same slot)."""
    src = bits_view(np.ascontiguousarray(x))
    shape = (1, src.shape[1], src.shape[0], src.shape[2])
    dst = np.empty(shape, src.dtype) if slot is None else scratch(f"head-major {slot}", shape, src.dtype)
    if dst.size:
        _head_major(src, dst, 256)
    return dst


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
    qh, kh, vh = (head_major(x, slot) for x, slot in ((q, "q"), (k, "k"), (v, "v")))
    with single_threaded_blas():
        dense._forward_packed(qh, kh, vh, cu_q, cu_k, tiles, spec.codec,
                              spec.scale, spec.window_left, spec.window_right, spec.softcap, slopes, has_alibi,
                              dense._extra(extra, spec), *dense.dropout_args(dropout, np.dtype(spec.accum_dtype)),
                              bits_view(out), lse, config.cpu_block_q,
                              config.cpu_block_k)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_q, cu_k, slopes, spec, extra, want_dbias, dropout=None):
    """``(dq, dk, dv, dbias)`` of a packed batch: the dense backward kernels on head-major copies, every
    sequence's key tiles in one parallel loop, gradients written packed (dbias: accumulation dtype)."""
    dq, dk, dv = (np.zeros(x.shape, spec.dtype) for x in (q, k, k))
    want_dbias = bool(want_dbias and extra.bias is not None)
    lens_q, lens_k = np.diff(cu_q), np.diff(cu_k)
    seqs = np.stack([np.zeros_like(cu_q[:-1]), cu_q[:-1], np.zeros_like(cu_k[:-1]), cu_k[:-1], lens_q, lens_k],
                    axis=1).astype(np.int64)
    if dq.size == 0 or dk.size == 0:
        return dq, dk, dv, (np.zeros(extra.bias_shape, spec.accum_dtype) if want_dbias else None)
    dh, qh, kh, vh, oh = (head_major(x, slot) for x, slot in ((dout, "dout"), (q, "q"), (k, "k"), (v, "v"),
                                                              (out, "out")))
    dbias = dense.run_backward((dh, oh), qh, kh, vh, np.ascontiguousarray(lse)[None], seqs, slopes, spec, extra,
                               want_dbias, bits_view(dq), bits_view(dk), bits_view(dv), int(q.shape[0]), dropout)
    return dq, dk, dv, (None if dbias is None else dbias.reshape(extra.bias_shape))
