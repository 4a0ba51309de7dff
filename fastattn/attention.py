"""Dense (flash) attention: public functions.

Each function validates its arguments, picks the CPU or CUDA backend from
the arrays' device, and calls the kernel; see ``docs/attention.md``.
"""
from dataclasses import replace

from . import _dispatch, _validate


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None, return_seed=False,
              return_lse=False):
    """Scaled dot-product attention with an online softmax (FlashAttention-2 semantics).

    Parameters
    ----------
    q : array, shape [B, Hq, Sq, D]
        Queries: float32, float64, float16 or ``ml_dtypes.bfloat16``; a NumPy
        array (CPU kernel) or a CUDA device array (CUDA kernel).
    k, v : array, shape [B, Hkv, Sk, D]
        Keys and values, same dtype and device as ``q``.  ``Hq`` must be a
        multiple of ``Hkv``: query head ``h`` reads KV head ``h // (Hq // Hkv)``
        (grouped-query / multi-query attention, nothing is repeated).
    causal : bool
        Bottom-right aligned causal mask: row ``i`` sees key ``j`` iff
        ``j <= i + Sk - Sq``.  Same as ``window=(left, 0)``.
    scale : float, optional
        Multiplies ``q . k``; defaults to ``1 / sqrt(D)``.
    window : (int, int)
        Sliding window ``(left, right)``: row ``i`` sees keys
        ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``; -1 means unbounded.
    softcap : float
        If positive, scores become ``softcap * tanh(score / softcap)``.
    alibi_slopes : array, shape [Hq] or [B, Hq], optional
        Adds ``-slope * |i + Sk - Sq - j|`` to the (softcapped) scores.
    bias : array, broadcastable to [B, Hq, Sq, Sk], optional
        Added to the scores after softcap and ALiBi (a pair bias, a relative
        position bias, or ``-inf`` where keys are excluded): float32 or the
        dtype of ``q``, on the device of ``q``.  Axes of size 1 (or missing
        leading axes) are read in place, never expanded.
    mask : bool array, broadcastable to [B, Hq, Sq, Sk], optional
        ``True`` where the key takes part (the meaning of PyTorch SDPA's boolean
        ``attn_mask``); combines with ``causal`` and ``window``.
    dropout_p : float in [0, 1)
        Dropout on the attention probabilities (FlashAttention's semantics: each
        probability is kept with ``1 - p`` and scaled by ``1 / (1 - p)``; lse is
        unaffected).  The keep bits come from Philox4x32-10 keyed by ``seed`` and
        counted by ``(batch, head, row, key)``: never stored, the same on the CPU
        and CUDA.
    seed : int in [0, 2**64), optional
        The dropout seed; None draws one from NumPy's default generator.
    return_seed : bool
        Also return the seed (None without dropout), for the backward.
    return_lse : bool
        Also return the natural-log sum of exponentials of each row's scores.

    Returns
    -------
    out : array, shape [B, Hq, Sq, D]
        In the dtype of ``q``, on the device of ``q``.
    lse : array, shape [B, Hq, Sq]
        Only with ``return_lse=True``; float32 (float64 for float64 inputs).
    seed : int or None
        Only with ``return_seed=True``, after ``lse``.

    Raises
    ------
    ValueError
        Bad shapes or values (the message names the argument).
    TypeError
        Bad dtypes, or arrays on different devices.

    Notes
    -----
    Accumulation is float32 (float64 for float64 inputs); no ``Sq x Sk`` matrix
    is allocated beyond the caller's own ``bias``/``mask``.  A row that sees no
    key (every key masked, or a ``-inf`` bias on all of them) gets ``out = 0``
    and ``lse = -inf``.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 8, 5, 64), dtype=np.float32)
    >>> k = rng.standard_normal((1, 2, 7, 64), dtype=np.float32)
    >>> v = rng.standard_normal((1, 2, 7, 64), dtype=np.float32)
    >>> out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    >>> out.shape, lse.dtype
    ((1, 8, 5, 64), dtype('float32'))
    >>> bool(np.allclose(out, fastattn.reference.attention(q, k, v, causal=True), atol=1e-5))
    True

    A bias shared by every batch and head, and a mask that keeps the first four keys:

    >>> bias = rng.standard_normal((5, 7), dtype=np.float32)   # [Sq, Sk]
    >>> keep = np.arange(7) < 4                                 # [Sk]
    >>> out = fastattn.attention(q, k, v, bias=bias, mask=keep)
    >>> ref = fastattn.reference.attention(q, k, v, bias=bias, mask=keep)
    >>> bool(np.allclose(out, ref, atol=1e-5))
    True
    """
    q, k, v, slopes, spec = _validate.attention_args(
        q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes)
    extra = _validate.extra_values(bias, mask, spec)
    dropout = _validate.dropout_values(dropout_p, seed, forward=True)
    backend = _dispatch.backend_of(q=q, k=k, v=v, alibi_slopes=slopes, bias=extra.bias, mask=extra.mask)
    out, lse = backend.attention.forward(q, k, v, slopes, spec, extra, dropout)
    result = (out,) + ((lse,) if return_lse else ()) + ((None if dropout is None else dropout[0],)
                                                        if return_seed else ())
    return result if len(result) > 1 else out


def _attention_block(q, k, v, *, q_start, k_start, seq_q, seq_k, causal=False, scale=None,
                     window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """``(out, lse)`` of one block of a bigger attention problem (private; used by fastattn.dask).

    ``q`` holds rows ``q_start ...`` of ``seq_q`` query rows and ``k``/``v``
    keys ``k_start ...`` of ``seq_k`` keys; masks and ALiBi distances are those
    of the whole problem (row ``i`` of it sits at key ``i + seq_k - seq_q``).
    Merging the blocks of all key ranges with :func:`merge_attention_states`
    gives :func:`attention` of the whole.
    """
    q, k, v, slopes, spec = _validate.attention_args(
        q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
        alibi_slopes=alibi_slopes)
    diag = q_start - k_start + seq_k - seq_q  # local key of local row 0's diagonal
    spec = replace(spec, shift=diag - (spec.seq_k - spec.seq_q))
    backend = _dispatch.backend_of(q=q, k=k, v=v, alibi_slopes=slopes)
    return backend.attention.forward(q, k, v, slopes, spec)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, window=(-1, -1),
                       softcap=0.0, alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None,
                       return_dbias=False):
    """Gradients of :func:`attention` with respect to q, k and v (and the bias).

    Probabilities are recomputed from ``lse`` (FlashAttention-2 style).  With
    grouped-query attention, ``dk`` and ``dv`` sum over the query heads of each
    KV head.  On the CPU the result is bitwise identical from run to run.

    Parameters
    ----------
    dout : array, shape [B, Hq, Sq, D]
        Gradient of the loss with respect to ``out``, dtype of ``q``.
    q, k, v : arrays
        The forward inputs.
    out, lse : arrays
        The forward outputs (``attention(..., return_lse=True)``).
    causal, scale, window, softcap, alibi_slopes, bias, mask
        The forward options, unchanged.
    dropout_p, seed
        The forward's dropout and its seed (required with ``dropout_p > 0``:
        ``attention(..., return_seed=True)``); the keep mask is regenerated.
    return_dbias : bool
        Also return the gradient with respect to ``bias`` (which must be given).

    Returns
    -------
    dq : array, shape [B, Hq, Sq, D]
    dk, dv : arrays, shape [B, Hkv, Sk, D]
        In the dtype of ``q``, on the device of ``q``; zero for keys no query sees.
    dbias : array, the shape and dtype of ``bias``
        Only with ``return_dbias=True``: the gradient of the scores summed over
        the axes ``bias`` broadcasts over, computed in the same pass (no
        probabilities stored); 0 where no key is seen.  On the CPU the same bits
        at any thread count; on CUDA broadcast axes are summed with atomics.

    Raises
    ------
    ValueError, TypeError
        As :func:`attention`, and for ``dout``/``out``/``lse`` that do not match.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 6, 16), dtype=np.float32) for _ in range(3))
    >>> out, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    >>> ref = fastattn.reference.attention_backward(np.ones_like(out), q, k, v, causal=True)
    >>> bool(np.allclose(dv, ref[2], atol=1e-5))
    True

    The gradient of a bias shared by both heads:

    >>> bias = rng.standard_normal((1, 1, 6, 6), dtype=np.float32)
    >>> out, lse = fastattn.attention(q, k, v, bias=bias, return_lse=True)
    >>> *_, dbias = fastattn.attention_backward(np.ones_like(out), q, k, v, out, lse, bias=bias,
    ...                                         return_dbias=True)
    >>> ref = fastattn.reference.attention_backward(np.ones_like(out), q, k, v, bias=bias, return_dbias=True)
    >>> dbias.shape, bool(np.allclose(dbias, ref[3], atol=1e-5))
    ((1, 1, 6, 6), True)
    """
    if return_dbias and bias is None:
        raise ValueError("return_dbias: expected a bias to differentiate, got bias=None")
    backend, grads, extra = _backward(dout, q, k, v, out, lse, causal=causal, scale=scale, window=window,
                                      softcap=softcap, alibi_slopes=alibi_slopes, bias=bias, mask=mask,
                                      return_dbias=return_dbias,
                                      dropout=_validate.dropout_values(dropout_p, seed, forward=False))
    if not return_dbias:
        return grads[:3]
    return (*grads[:3], backend.attention.cast(grads[3], extra.bias.dtype))


def _backward(dout, q, k, v, out, lse, *, bias, mask, return_dbias, dropout=None, **options):
    """``(backend, (dq, dk, dv, dbias), extra)`` of :func:`attention_backward`, dbias in accumulation precision."""
    dout, q, k, v, out, lse, slopes, spec = _validate.attention_backward_args(dout, q, k, v, out, lse, **options)
    extra = _validate.extra_values(bias, mask, spec)
    backend = _dispatch.backend_of(dout=dout, q=q, k=k, v=v, out=out, lse=lse, alibi_slopes=slopes,
                                   bias=extra.bias, mask=extra.mask)
    return (backend, backend.attention.backward(dout, q, k, v, out, lse, slopes, spec, extra, return_dbias, dropout),
            extra)


def merge_attention_states(outs, lses):
    """Combine attention results computed over disjoint sets of keys.

    If ``outs[i]`` and ``lses[i]`` are the output and log-sum-exp of attention
    over key set ``K_i``, the result is the output and log-sum-exp over the
    union of the ``K_i`` (FlashAttention's split-KV combine)::

        lse = log(sum_i exp(lses[i]))
        out = sum_i exp(lses[i] - lse) * outs[i]

    Parameters
    ----------
    outs : sequence of arrays, shape [..., D] (or one array [N, ..., D])
        Partial outputs: float32, float64, float16 or bfloat16, all alike.
    lses : sequence of arrays, shape [...] (or one array [N, ...])
        Their natural-log sums of exponentials, float32 or float64.  A part
        with ``lse = -inf`` (it saw no key) has no weight; if every part has
        ``-inf`` the output is 0 and the lse ``-inf``, never NaN.

    Returns
    -------
    out : array, shape [..., D]
        In the dtype of ``outs``, on their device.
    lse : array, shape [...]
        float32 (float64 for float64 outputs).

    Raises
    ------
    ValueError, TypeError
        Parts of different shapes or dtypes, or mixed devices.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 3, 8), dtype=np.float32) for _ in range(3))
    >>> halves = [fastattn.attention(q, k[:, :, s], v[:, :, s], return_lse=True)
    ...           for s in (slice(0, 1), slice(1, 3))]
    >>> out, lse = fastattn.merge_attention_states([h[0] for h in halves], [h[1] for h in halves])
    >>> bool(np.allclose(out, fastattn.attention(q, k, v), atol=1e-6))
    True
    """
    outs, lses, dtype = _validate.merge_args(outs, lses)
    named = {f"outs[{i}]": o for i, o in enumerate(outs)}
    named.update({f"lses[{i}]": x for i, x in enumerate(lses)})
    backend = _dispatch.backend_of(**named)
    return backend.attention.merge_states(outs, lses, dtype)
