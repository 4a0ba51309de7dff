"""Attention over packed variable-length batches (FlashAttention's ``varlen`` layout).

Sequences of different lengths travel packed, one after the other, in
``[total, H, D]`` arrays with offsets ``cu_seqlens`` (``[B + 1]``, 0 first,
the total last).  Each sequence is its own problem; no padding is ever made.
"""
import numpy as np

from . import _dispatch, _validate


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None, max_seqlen_k=None, causal=False,
                     scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None, mask=None,
                     dropout_p=0.0, seed=None, return_seed=False, return_lse=False):
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
    dropout_p, seed, return_seed
        As :func:`attention`; sequence ``i`` draws its keep bits as batch ``i``.
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
    Nothing is copied or padded: the kernels read the packed rows in place.
    On the CPU one parallel loop runs the query tiles of every sequence and
    head, so one long sequence among many short ones keeps every core busy;
    the backward runs the sequences one after the other, each over every
    core.  On CUDA each sequence is one launch of the dense kernels.

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
    q, k, v, cu_q, cu_k, slopes, spec = _validate.varlen_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes)
    extra = _validate.extra_values(bias, mask, spec)
    dropout = _validate.dropout_values(dropout_p, seed, forward=True)
    backend = _dispatch.backend_of(q=q, k=k, v=v, alibi_slopes=slopes, bias=extra.bias, mask=extra.mask)
    out, lse = backend.varlen.forward(q, k, v, cu_q, cu_k, slopes, spec, extra, dropout)
    result = (out,) + ((lse,) if return_lse else ()) + ((None if dropout is None else dropout[0],)
                                                        if return_seed else ())
    return result if len(result) > 1 else out


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                              max_seqlen_k=None, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                              alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None, return_dbias=False):
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
    max_seqlen_q, max_seqlen_k, causal, scale, window, softcap, alibi_slopes, bias, mask, dropout_p, seed
        The forward options, unchanged (the seed is required with dropout).
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
    q, k, v, cu_q, cu_k, slopes, spec = _validate.varlen_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes)
    dout, out = _validate.as_array("dout", dout), _validate.as_array("out", out)
    lse = _validate.as_array("lse", lse)
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != tuple(q.shape):
            raise ValueError(f"{name}: expected the shape of q {tuple(q.shape)}, got {tuple(x.shape)}")
    _validate.same_dtype(spec.dtype, dout=dout, out=out)
    if tuple(lse.shape) != (int(q.shape[1]), int(q.shape[0])):
        raise ValueError(f"lse: expected shape [Hq, total_q] = {(int(q.shape[1]), int(q.shape[0]))}, "
                         f"got {tuple(lse.shape)}")
    if np.dtype(lse.dtype) != spec.accum_dtype:
        raise TypeError(f"lse: expected dtype {spec.accum_dtype} (as returned with return_lse=True), "
                        f"got {np.dtype(lse.dtype)}")
    if return_dbias and bias is None:
        raise ValueError("return_dbias: expected a bias to differentiate, got bias=None")
    extra = _validate.extra_values(bias, mask, spec)
    dropout = _validate.dropout_values(dropout_p, seed, forward=False)
    backend = _dispatch.backend_of(dout=dout, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=slopes,
                                   bias=extra.bias, mask=extra.mask)
    dq, dk, dv, dbias = backend.varlen.backward(dout, q, k, v, out, lse, cu_q, cu_k, slopes, spec, extra,
                                                return_dbias, dropout)
    if not return_dbias:
        return dq, dk, dv
    return dq, dk, dv, backend.attention.cast(dbias, extra.bias.dtype)
