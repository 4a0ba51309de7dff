"""Attention over packed variable-length batches (FlashAttention's ``varlen`` layout).

Sequences of different lengths travel packed, one after the other, in
``[total, H, D]`` arrays with offsets ``cu_seqlens`` (``[B + 1]``, 0 first,
the total last).  Each sequence is its own problem; no padding is ever made.
"""
from types import SimpleNamespace

import numpy as np

from . import _dispatch, _validate
from ._dtypes import accum_dtype
from .attention import _backward, attention


def _options(causal, scale, window, softcap):
    return dict(causal=causal, scale=scale, window=window, softcap=softcap)


def _extra(bias, mask, q, cu_q, cu_k, max_seqlen_q, max_seqlen_k):
    """The checked bias and mask of a packed batch: broadcastable to ``[B, Hq, max_q, max_k]``."""
    longest = [int(np.diff(cu).max(initial=0)) for cu in (cu_q, cu_k)]
    spec = SimpleNamespace(batch=len(cu_q) - 1, heads_q=int(q.shape[1]), dtype=np.dtype(q.dtype),
                           seq_q=longest[0] if max_seqlen_q is None else int(max_seqlen_q),
                           seq_k=longest[1] if max_seqlen_k is None else int(max_seqlen_k))
    return _validate.extra_values(bias, mask, spec)


def _corner(x, i, sq, sk):
    """Sequence ``i``'s part of a 4-d bias or mask: batch ``i``, rows ``:sq``, keys ``:sk`` (broadcast axes as they are)."""
    if x is None:
        return None
    b = i if x.shape[0] > 1 else 0
    return x[b:b + 1, :, :(sq if x.shape[2] > 1 else 1), :(sk if x.shape[3] > 1 else 1)]


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None, mask=None,
                     return_lse=False):
    """:func:`attention` over a packed batch of sequences of different lengths.

    Parameters
    ----------
    q : array, shape [total_q, Hq, D]
        The queries of every sequence, packed: sequence ``i`` holds rows
        ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]``.  Dtypes and devices as in
        :func:`attention`.
    k, v : array, shape [total_k, Hkv, D]
        Keys and values, packed the same way by ``cu_seqlens_k``.
    cu_seqlens_q, cu_seqlens_k : int array, shape [B + 1]
        Offsets of the sequences: 0 first, non-decreasing, the number of packed
        rows last.  Zero-length sequences are allowed.
    max_seqlen_q, max_seqlen_k : int, optional
        FlashAttention's length hints; when given, checked to be at least the
        longest sequence, and the padded sizes of ``bias`` and ``mask``.
    causal, scale, window, softcap
        As :func:`attention`, applied to each sequence on its own (bottom-right
        aligned: row ``i`` of a sequence sees key ``j`` of the same sequence iff
        ``j <= i + Sk - Sq``).
    alibi_slopes : array, shape [Hq] or [B, Hq], optional
        As :func:`attention`; ``[B, Hq]`` gives each sequence its own slopes.
    bias, mask : arrays broadcastable to [B, Hq, max_seqlen_q, max_seqlen_k], optional
        As :func:`attention`, in padded coordinates: sequence ``i`` reads the
        top-left ``[Sq_i, Sk_i]`` corner of batch ``i`` (the maximum lengths
        default to the longest sequences).  Axes of length 1 are shared.
    return_lse : bool
        Also return the log-sum-exp of each packed query row.

    Returns
    -------
    out : array, shape [total_q, Hq, D]
        In the dtype and on the device of ``q``.
    lse : array, shape [Hq, total_q]
        Only with ``return_lse=True``; float32 (float64 for float64 inputs),
        ``-inf`` for rows that see no key.

    Raises
    ------
    ValueError
        Offsets that do not start at 0, decrease, or do not end at the number
        of packed rows; batches of different sizes; shapes as in :func:`attention`.
    TypeError
        Offsets that are not integers; dtypes and devices as in :func:`attention`.

    Notes
    -----
    Each sequence's rows are copied head-major (no padding; on every core)
    and run through the dense kernels, one sequence after the other; each
    call spreads its heads and query tiles over every core, so one long
    sequence among many short ones keeps the machine busy.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 3, 8], np.int32)              # two sequences: 3 and 5 tokens
    >>> q, k, v = (rng.standard_normal((8, 2, 16), dtype=np.float32) for _ in range(3))
    >>> out = fastattn.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> first = fastattn.attention(*(x[:3].transpose(1, 0, 2)[None] for x in (q, k, v)), causal=True)
    >>> out.shape, bool(np.allclose(out[:3], first[0].transpose(1, 0, 2), atol=1e-5))
    ((8, 2, 16), True)
    """
    q, k, v, cu_q, cu_k = _validate.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    extra = _extra(bias, mask, q, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    backend = _dispatch.backend_of(q=q, k=k, v=v, alibi_slopes=alibi_slopes, bias=extra.bias, mask=extra.mask).varlen
    out = backend.zeros(tuple(q.shape), q.dtype)
    lse = backend.lse_zeros(int(q.shape[1]), int(q.shape[0]), q.dtype)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if q1 == q0:
            continue
        o, l = attention(backend.heads_view(q, q0, q1), backend.heads_view(k, k0, k1), backend.heads_view(v, k0, k1),
                         alibi_slopes=backend.row(alibi_slopes, i), bias=_corner(extra.bias, i, q1 - q0, k1 - k0),
                         mask=_corner(extra.mask, i, q1 - q0, k1 - k0), return_lse=True,
                         **_options(causal, scale, window, softcap))
        backend.put_rows(out, q0, o)
        backend.put_lse(lse, q0, l)
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                              alibi_slopes=None, bias=None, mask=None, return_dbias=False):
    """Gradients of :func:`attention_varlen` with respect to the packed q, k and v.

    Parameters
    ----------
    dout : array, shape [total_q, Hq, D]
        Gradient of the loss with respect to ``out``.
    q, k, v, cu_seqlens_q, cu_seqlens_k
        The forward inputs.
    out, lse : arrays
        The forward outputs (``attention_varlen(..., return_lse=True)``):
        ``[total_q, Hq, D]`` and ``[Hq, total_q]``.
    max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, alibi_slopes, bias, mask
        The forward options, unchanged.
    return_dbias : bool
        Also return the gradient with respect to ``bias`` (which must be given).

    Returns
    -------
    dq : array, shape [total_q, Hq, D]
    dk, dv : arrays, shape [total_k, Hkv, D]
        In the dtype and on the device of ``q``; zero for the keys of a
        sequence with no query.  On the CPU the same bits at any thread count.
    dbias : array, the shape and dtype of ``bias``
        Only with ``return_dbias=True``; zero outside every sequence's corner.

    Raises
    ------
    ValueError, TypeError
        As :func:`attention_varlen`, and for ``dout``/``out``/``lse`` of the wrong shape.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(1)
    >>> cu_q, cu_k = np.array([0, 2, 5], np.int32), np.array([0, 4, 9], np.int32)
    >>> q = rng.standard_normal((5, 2, 8), dtype=np.float32)
    >>> k, v = (rng.standard_normal((9, 1, 8), dtype=np.float32) for _ in range(2))
    >>> out, lse = fastattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    >>> dq, dk, dv = fastattn.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu_q, cu_k)
    >>> ref = fastattn.reference.attention_varlen_backward(np.ones_like(out), q, k, v, cu_q, cu_k)
    >>> bool(np.allclose(dk, ref[1], atol=1e-5)), dv.shape
    (True, (9, 1, 8))
    """
    q, k, v, cu_q, cu_k = _validate.varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dout, out = _validate.as_array("dout", dout), _validate.as_array("out", out)
    lse = _validate.as_array("lse", lse)
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    if tuple(lse.shape) != (int(q.shape[1]), int(q.shape[0])):
        raise ValueError(f"lse: expected shape [Hq, total_q] = {(int(q.shape[1]), int(q.shape[0]))}, "
                         f"got {tuple(lse.shape)}")
    if return_dbias and bias is None:
        raise ValueError("return_dbias: expected a bias to differentiate, got bias=None")
    extra = _extra(bias, mask, q, cu_q, cu_k, max_seqlen_q, max_seqlen_k)
    backend = _dispatch.backend_of(dout=dout, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=alibi_slopes,
                                   bias=extra.bias, mask=extra.mask)
    helpers = backend.varlen
    dq = helpers.zeros(tuple(q.shape), q.dtype)
    dk = helpers.zeros(tuple(k.shape), k.dtype)
    dv = helpers.zeros(tuple(v.shape), v.dtype)
    dbias = helpers.zeros(tuple(extra.bias.shape), accum_dtype(q.dtype)) if return_dbias else None
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if q1 == q0 or k1 == k0:
            continue
        rows = [helpers.heads_view(x, q0, q1) for x in (dout, q)]
        keys = [helpers.heads_view(x, k0, k1) for x in (k, v)]
        _, grads, _ = _backward(*rows, *keys, helpers.heads_view(out, q0, q1), helpers.lse_view(lse, q0, q1),
                                alibi_slopes=helpers.row(alibi_slopes, i),
                                bias=_corner(extra.bias, i, q1 - q0, k1 - k0),
                                mask=_corner(extra.mask, i, q1 - q0, k1 - k0), return_dbias=return_dbias,
                                **_options(causal, scale, window, softcap))
        for dst, start, grad in zip((dq, dk, dv), (q0, k0, k0), grads):
            helpers.put_rows(dst, start, grad)
        if return_dbias:  # sequences sharing a broadcast batch axis add up, in order
            helpers.add_into(_corner(dbias, i, q1 - q0, k1 - k0), grads[3])
    if not return_dbias:
        return dq, dk, dv
    return dq, dk, dv, backend.attention.cast(dbias.reshape(extra.bias_shape), extra.bias.dtype)
