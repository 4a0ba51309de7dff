"""Paged attention: public functions over a block-paged KV cache.

The caches are ``[num_blocks, block_size, Hkv, D]``; a sequence's token ``t``
lives in block ``block_table[b, t // block_size]``, row ``t % block_size``
(vLLM's layout).  Each function validates its arguments (block-table entries
and slots included, before any launch), picks the CPU or CUDA backend from the
arrays' device and calls the kernel; see ``docs/paged.md``.
"""
import numpy as np

from . import _dispatch, _validate
from ._dispatch import as_array


def _index_arrays(block_table, seq_lens):
    arrays = {"block_table": block_table}
    if not isinstance(seq_lens, (int, np.integer)):  # one length for all is a number, on no device
        arrays["seq_lens"] = seq_lens
    return arrays


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, causal=False, scale=None,
                    window=(-1, -1), softcap=0.0, alibi_slopes=None, return_lse=False):
    """Attention of each sequence's last ``Sq`` tokens over its keys in a paged KV cache.

    Decode is ``Sq = 1``; chunked prefill is ``Sq > 1``, with the masks aligned
    to each sequence's own length (bottom right).  Sequences of different
    lengths share one call; a long sequence is split over the cores / SMs and
    its partial results merged (split-KV, "flash decoding").

    Parameters
    ----------
    q : array, shape [B, Hq, Sq, D]
        Queries: float32, float64, float16 or ``ml_dtypes.bfloat16``.
    k_cache, v_cache : arrays, shape [num_blocks, block_size, Hkv, D]
        The caches, in the dtype of ``q``; ``Hq`` is a multiple of ``Hkv``
        (query head ``h`` reads KV head ``h // (Hq // Hkv)``).
    block_table : int array, shape [B, max_blocks]
        Physical block of each logical block of each sequence.  Only the
        entries that are read (the first ``ceil(seq_lens[b] / block_size)``)
        must lie in ``[0, num_blocks)``; the rest may hold anything.
        Several sequences may share blocks.
    seq_lens : int array, shape [B], or int
        Keys per sequence.  0 (a padding slot: zeros and ``lse = -inf``) or at
        least ``Sq``, and at most ``max_blocks * block_size``.
    causal, scale, window, softcap, alibi_slopes, return_lse
        As :func:`fastattn.attention`, with ``Sk = seq_lens[b]`` per sequence.

    Returns
    -------
    out : array, shape [B, Hq, Sq, D]
        In the dtype of ``q``, on the device of ``q``.
    lse : array, shape [B, Hq, Sq]
        Only with ``return_lse=True``: float32 (float64 for float64 inputs).

    Raises
    ------
    ValueError
        Bad shapes, lengths, or block-table entries outside the cache.
    TypeError
        Bad dtypes (including a non-integer table), or mixed devices.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> k_cache = rng.standard_normal((6, 4, 2, 16), dtype=np.float32)  # 6 blocks of 4 tokens
    >>> v_cache = rng.standard_normal((6, 4, 2, 16), dtype=np.float32)
    >>> table = np.array([[0, 1, 2], [3, 1, 5]], np.int32)  # the sequences share block 1
    >>> q = rng.standard_normal((2, 8, 1, 16), dtype=np.float32)  # one decode step, 8 query heads
    >>> out = fastattn.paged_attention(q, k_cache, v_cache, table, np.array([9, 7], np.int32))
    >>> ref = fastattn.reference.paged_attention(q, k_cache, v_cache, table, [9, 7])
    >>> out.shape, bool(np.allclose(out, ref, atol=1e-5))
    ((2, 8, 1, 16), True)
    """
    q, k_cache, v_cache, table, lens, slopes, spec = _validate.paged_args(
        q, k_cache, v_cache, block_table, seq_lens, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes)
    backend = _dispatch.backend_of(q=q, k_cache=k_cache, v_cache=v_cache, alibi_slopes=slopes,
                                   **_index_arrays(block_table, seq_lens))
    out, lse = backend.paged.forward(q, k_cache, v_cache, table, lens, slopes, spec)
    return (out, lse) if return_lse else out


def paged_attention_fp8(q, k_cache, v_cache, block_table, seq_lens, *, q_scale=1.0, k_scale=1.0,
                        v_scale=1.0, o_scale=None, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                        alibi_slopes=None, return_lse=False):
    """:func:`paged_attention` over fp8 caches, with quantisation scales.

    Cache entries decode as ``raw * k_scale`` and ``raw * v_scale``; an fp8
    ``q`` decodes as ``raw * q_scale``.  The scales fold into the query and
    the output, so they cost nothing.

    Parameters
    ----------
    q : array, shape [B, Hq, Sq, D]
        float32, float16, bfloat16, or fp8 (``float8_e4m3fn`` / ``float8_e5m2``).
    k_cache, v_cache : arrays, shape [num_blocks, block_size, Hkv, D]
        ``ml_dtypes.float8_e4m3fn`` or ``float8_e5m2`` (both the same).
    block_table, seq_lens
        As :func:`paged_attention`.
    q_scale : float
        Dequantisation scale of ``q`` (applies whatever the dtype of ``q``).
    k_scale, v_scale : float or array of shape [Hkv]
        Dequantisation scales of the caches, one for all or one per KV head.
    o_scale : float, optional
        If given, the output is fp8 (the format of the cache) holding
        ``saturate(out / o_scale)``; otherwise it is float32.
    causal, scale, window, softcap, alibi_slopes, return_lse
        As :func:`paged_attention`; the scores they act on are those of the
        dequantised ``q`` and keys (softcap after the scales, ALiBi after softcap).

    Returns
    -------
    out : array, shape [B, Hq, Sq, D]
        float32, or fp8 with ``o_scale``.
    lse : array, shape [B, Hq, Sq]
        float32, only with ``return_lse=True`` (of the dequantised scores).

    Raises
    ------
    ValueError
        As :func:`paged_attention`, and scales that are not finite and > 0.
    TypeError
        Caches that are not fp8, and the errors of :func:`paged_attention`.

    Examples
    --------
    >>> import ml_dtypes, numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> k_cache, v_cache = (rng.uniform(-2, 2, (4, 8, 1, 16)).astype(ml_dtypes.float8_e4m3fn)
    ...                     for _ in range(2))
    >>> q = rng.standard_normal((1, 4, 1, 16), dtype=np.float32)
    >>> table = np.array([[2, 0, 3]], np.int32)
    >>> out = fastattn.paged_attention_fp8(q, k_cache, v_cache, table, 20, k_scale=0.5, v_scale=0.25)
    >>> ref = fastattn.reference.paged_attention(q, k_cache, v_cache, table, [20], k_scale=0.5, v_scale=0.25)
    >>> out.dtype, bool(np.allclose(out, ref, atol=1e-5))
    (dtype('float32'), True)
    """
    q, k_cache, v_cache, table, lens, slopes, spec = _validate.paged_args(
        q, k_cache, v_cache, block_table, seq_lens, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, fp8=True)
    scales = dict(q_scale=_validate.positive_scale("q_scale", q_scale),
                  k_scale=_validate.positive_scale("k_scale", k_scale, spec.heads_kv),
                  v_scale=_validate.positive_scale("v_scale", v_scale, spec.heads_kv))
    if o_scale is None:
        out_dtype, out_scale = np.dtype(np.float32), 1.0
    else:
        out_dtype, out_scale = spec.cache_dtype, _validate.positive_scale("o_scale", o_scale)
    backend = _dispatch.backend_of(q=q, k_cache=k_cache, v_cache=v_cache, alibi_slopes=slopes,
                                   **_index_arrays(block_table, seq_lens))
    out, lse = backend.paged.forward(q, k_cache, v_cache, table, lens, slopes, spec, out_dtype=out_dtype,
                                     out_scale=out_scale, **scales)
    return (out, lse) if return_lse else out


def paged_attention_backward(dout, q, k_cache, v_cache, out, lse, block_table, seq_lens, *,
                             causal=False, scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Gradients of :func:`paged_attention` with respect to q and the whole caches.

    Parameters
    ----------
    dout : array, shape [B, Hq, Sq, D]
        Gradient of the loss with respect to ``out``, dtype of ``q``.
    q, k_cache, v_cache, block_table, seq_lens
        The forward inputs.
    out, lse : arrays
        The forward outputs (``paged_attention(..., return_lse=True)``).
    causal, scale, window, softcap, alibi_slopes
        The forward options, unchanged.

    Returns
    -------
    dq : array, shape [B, Hq, Sq, D]
    dk_cache, dv_cache : arrays, shape [num_blocks, block_size, Hkv, D]
        In the dtype of ``q``; zero where no sequence reads.  A block read by
        several sequences (a shared prefix) holds the sum of their
        contributions.  On the CPU the sums run in a fixed order (each task
        owns physical blocks), so results are bitwise identical run to run; on
        the GPU they are accumulated with atomics.

    Raises
    ------
    ValueError, TypeError
        As :func:`paged_attention`, and for ``dout``/``out``/``lse`` that do not match.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(1)
    >>> k_cache, v_cache = (rng.standard_normal((5, 4, 1, 8), dtype=np.float32) for _ in range(2))
    >>> table = np.array([[0, 1, 2], [0, 1, 4]], np.int32)  # blocks 0 and 1 are a shared prefix
    >>> q = rng.standard_normal((2, 2, 3, 8), dtype=np.float32)
    >>> out, lse = fastattn.paged_attention(q, k_cache, v_cache, table, 10, causal=True, return_lse=True)
    >>> dq, dk_cache, dv_cache = fastattn.paged_attention_backward(
    ...     np.ones_like(out), q, k_cache, v_cache, out, lse, table, 10, causal=True)
    >>> ref = fastattn.reference.paged_attention_backward(
    ...     np.ones_like(out), q, k_cache, v_cache, block_table=table, seq_lens=[10, 10], causal=True)
    >>> bool(np.allclose(dk_cache, ref[1], atol=1e-5)), float(np.abs(dv_cache[3]).max())
    (True, 0.0)
    """
    dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec = _validate.paged_backward_args(
        dout, q, k_cache, v_cache, out, lse, block_table, seq_lens, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes)
    backend = _dispatch.backend_of(dout=dout, q=q, k_cache=k_cache, v_cache=v_cache, out=out, lse=lse,
                                   alibi_slopes=slopes, **_index_arrays(block_table, seq_lens))
    return backend.paged.backward(dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0, rotary=None, positions=None,
                   interleaved=False):
    """Write new keys and values into the paged caches, in place.

    Token ``t`` goes to block ``slot_mapping[t] // block_size``, row
    ``slot_mapping[t] % block_size``; a negative slot is skipped (a padding
    token).  Values are converted to the caches' dtype rounding to nearest
    even; fp8 caches store ``saturate(x / scale)``.

    Parameters
    ----------
    k, v : arrays, shape [T, Hkv, D]
        float32, float64, float16 or bfloat16 (both the same).
    k_cache, v_cache : arrays, shape [num_blocks, block_size, Hkv, D]
        Written in place: float caches, or fp8 (``float8_e4m3fn``, ``float8_e5m2``).
    slot_mapping : int array, shape [T]
        Slots ``block * block_size + row``; each at most once; negative = skip.
    k_scale, v_scale : float or array of shape [Hkv]
        Quantisation scales of fp8 caches (must be 1 for float caches).
    rotary : (cos, sin), optional
        Rotary tables (:func:`fastattn.rotary_tables`): the keys are rotated on
        their way into the cache (before scaling and rounding to the cache's
        dtype, fp8 included), as :func:`fastattn.rotary` would turn them; the
        values are written as they are.
    positions : int array, shape [T], optional
        Each token's position for ``rotary`` (default ``0 .. T-1``).
    interleaved : bool
        GPT-J's pairing for ``rotary``.

    Returns
    -------
    None

    Raises
    ------
    ValueError
        Bad shapes, slots outside the cache or repeated, bad scales.
    TypeError
        Bad dtypes, or mixed devices.  Nothing is written when anything is rejected.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> k_cache = np.zeros((3, 4, 1, 2), np.float32); v_cache = np.zeros_like(k_cache)
    >>> k = np.arange(6, dtype=np.float32).reshape(3, 1, 2); v = -k
    >>> fastattn.write_kv_cache(k, v, k_cache, v_cache, np.array([5, -1, 8]))
    >>> k_cache[1, 1, 0], k_cache[2, 0, 0], float(np.abs(k_cache).sum())
    (array([0., 1.], dtype=float32), array([4., 5.], dtype=float32), 10.0)
    """
    k_cache, v_cache = as_array("k_cache", k_cache), as_array("v_cache", v_cache)
    k, v, slots, k_scale, v_scale = _validate.write_kv_args(k, v, k_cache, v_cache, slot_mapping,
                                                            k_scale, v_scale)
    plan = None
    if rotary is not None:
        plan = _validate.rotary_plan(rotary, positions, interleaved, 1, int(k.shape[0]), int(k.shape[2]))
    elif positions is not None:
        raise ValueError("positions: expected rotary=(cos, sin) to go with them, got rotary=None")
    tables = {} if plan is None else {"cos": plan.cos, "sin": plan.sin}
    backend = _dispatch.backend_of(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping, **tables)
    backend.paged.write(k, v, k_cache, v_cache, slots, k_scale, v_scale, rotary=plan)
