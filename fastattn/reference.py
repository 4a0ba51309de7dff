"""Plain NumPy float64 attention: the oracle for tests and docs.

Written for clarity, not speed: it materialises the full ``Sq x Sk`` score
matrix.  Inputs of any float dtype (bfloat16 included) are upcast to float64.
Options follow :func:`fastattn.attention` exactly.
"""
import numpy as np


def _f64(x):
    return np.asarray(x).astype(np.float64)


def visible_mask(sq, sk, *, causal=False, window=(-1, -1)):
    """Boolean ``[Sq, Sk]`` mask of the keys each query row may see (bottom-right aligned)."""
    left, right = window
    if causal:
        right = 0
    diag = np.arange(sq)[:, None] + sk - sq
    j = np.arange(sk)[None, :]
    mask = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        mask &= j >= diag - left
    if right >= 0:
        mask &= j <= diag + right
    return mask


def _scores(q, k, scale, softcap, alibi_slopes, causal, window, bias=None, mask=None):
    """Return (scores, capped, mask): capped is the pre-ALiBi softcapped score.

    ``bias`` (broadcastable to ``[B, Hq, Sq, Sk]``) is added after softcap and
    ALiBi; ``mask`` (boolean, broadcastable the same way, ``True`` = the key
    takes part) combines with ``causal`` and ``window``.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    kk = np.repeat(k, hq // hkv, axis=1)
    x = np.einsum("bhid,bhjd->bhij", q, kk) * scale
    capped = softcap * np.tanh(x / softcap) if softcap else x
    s = capped.copy()
    if alibi_slopes is not None:
        slopes = np.broadcast_to(_f64(alibi_slopes), (b, hq))
        dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
        s -= slopes[:, :, None, None] * dist
    if bias is not None:
        s = s + _f64(bias)
    visible = visible_mask(sq, sk, causal=causal, window=window)
    if mask is not None:
        visible = visible & np.asarray(mask, bool)
    visible = np.broadcast_to(visible, s.shape)
    s = np.where(visible, s, -np.inf)
    return s, capped, visible


def dropout_scale(shape, dropout_p, seed, first_batch=0):
    """``keep / (1 - p)`` over ``[B, Hq, Sq, Sk]`` (1 without dropout): Philox4x32-10 in NumPy, vectorised,
    with the counters and the key of :mod:`fastattn._philox` (batches counted from ``first_batch``)."""
    if not dropout_p:
        return np.ones(shape)
    from . import _philox

    u = np.uint64
    b, h, i, j = np.meshgrid(*(np.arange(n, dtype=u) for n in shape), indexing="ij")
    b = b + u(first_batch)
    lo, hi = _philox.seed_words(int(seed))
    words = _philox.build(decorate=lambda fn: fn).philox(j >> u(2), i, h, b, lo, hi)
    word = np.choose((j & u(3)).astype(np.intp), words)
    return np.where(word >= _philox.threshold(dropout_p), 1.0 / (1.0 - dropout_p), 0.0)


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, bias=None, mask=None, dropout_p=0.0, seed=None, dropout_batch=0,
              return_lse=False):
    """Float64 reference of :func:`fastattn.attention`; returns float64 arrays.

    ``bias`` and ``mask`` are broadcastable to ``[B, Hq, Sq, Sk]``: the bias is
    added to the scores after softcap and ALiBi, the mask (``True`` = the key
    takes part, as in PyTorch's SDPA) hides keys like ``causal`` and ``window``.
    ``dropout_p``/``seed``: the probabilities times :func:`dropout_scale` (lse unaffected), batch
    ``b`` drawing its keep bits as batch ``dropout_batch + b`` (a packed sequence's index).
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s, _, _ = _scores(q, k, scale, softcap, alibi_slopes, causal, window, bias, mask)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    p = np.exp(s - np.where(seen, row_max, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    p = np.where(seen, p / np.where(seen, total, 1.0), 0.0)
    vv = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    out = (p * dropout_scale(p.shape, dropout_p, seed, dropout_batch)) @ vv
    with np.errstate(divide="ignore"):
        lse = np.where(seen, row_max + np.log(total), -np.inf)[..., 0]
    return (out, lse) if return_lse else out


def _reduce_to(x, shape):
    """Sum ``x`` over the axes that ``shape`` broadcasts (length 1 or missing): the gradient of a
    broadcast operand."""
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead))) if lead else x
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_backward(dout, q, k, v, out=None, lse=None, *, causal=False, scale=None,
                       window=(-1, -1), softcap=0.0, alibi_slopes=None, bias=None, mask=None,
                       dropout_p=0.0, seed=None, dropout_batch=0, return_dbias=False):
    """Float64 reference of :func:`fastattn.attention_backward`: (dq, dk, dv), and dbias.

    ``out`` and ``lse`` are accepted for signature parity and ignored: the
    reference recomputes them in float64.  With ``return_dbias=True`` the
    result is ``(dq, dk, dv, dbias)``, dbias in the shape of ``bias`` (the
    score gradient summed over the axes the bias broadcasts).
    """
    dout, q, k, v = _f64(dout), _f64(q), _f64(k), _f64(v)
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s, capped, _ = _scores(q, k, scale, softcap, alibi_slopes, causal, window, bias, mask)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    p = np.exp(s - np.where(seen, row_max, 0.0))
    p = np.where(seen, p / np.where(seen, p.sum(axis=-1, keepdims=True), 1.0), 0.0)
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    keep = dropout_scale(p.shape, dropout_p, seed, dropout_batch)
    dv_full = (p * keep).transpose(0, 1, 3, 2) @ dout
    dp = (dout @ vv.transpose(0, 1, 3, 2)) * keep
    o = (p * keep) @ vv
    delta = (dout * o).sum(axis=-1, keepdims=True)
    ds_bias = p * (dp - delta)  # the gradient of the scores after softcap: the bias's
    ds = ds_bias * (1.0 - (capped / softcap) ** 2) if softcap else ds_bias
    dq = scale * ds @ kk
    dk_full = scale * ds.transpose(0, 1, 3, 2) @ q
    b, _, sk, d = k.shape
    dk = dk_full.reshape(b, hkv, group, sk, d).sum(axis=2)
    dv = dv_full.reshape(b, hkv, group, sk, d).sum(axis=2)
    if not return_dbias:
        return dq, dk, dv
    return dq, dk, dv, (None if bias is None else _reduce_to(ds_bias, np.shape(bias)))


def _segments(cu_seqlens):
    cu = np.asarray(cu_seqlens, np.int64)
    return list(zip(cu[:-1], cu[1:]))


def varlen_corner(x, i, sq, sk):
    """Sequence ``i``'s part of a varlen bias or mask ``[B, Hq, max_q, max_k]`` (any axis 1, leading axes
    optional): rows ``:sq``, keys ``:sk`` of batch ``i``, broadcast axes kept at length 1."""
    if x is None:
        return None
    shape = (1,) * (4 - len(x.shape)) + tuple(x.shape)
    x = x.reshape(shape)
    b = i if shape[0] > 1 else 0
    return x[b:b + 1, :, :(sq if shape[2] > 1 else 1), :(sk if shape[3] > 1 else 1)]


def _varlen_options(options, i, sq, sk):
    options = _sequence_options(options, i)
    if options.get("dropout_p"):  # sequence i draws its keep bits as batch i
        options = dict(options, dropout_batch=i)
    for name in ("bias", "mask"):
        if options.get(name) is not None:
            options = dict(options, **{name: varlen_corner(np.asarray(options[name]), i, sq, sk)})
    return options


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, **options):
    """Float64 reference of :func:`fastattn.attention_varlen` on packed sequences.

    ``q [total_q, Hq, D]``, ``k``/``v`` ``[total_k, Hkv, D]``; sequence ``i``
    holds rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of ``q`` (and likewise
    for the keys) and is its own problem, bottom-right aligned as in
    :func:`attention`.  A ``bias`` or ``mask`` is ``[B, Hq, max_q, max_k]``
    (broadcastable): sequence ``i`` reads its top-left ``[Sq_i, Sk_i]`` corner
    of batch ``i``.  Returns ``out [total_q, Hq, D]`` and, with
    ``return_lse``, ``lse [Hq, total_q]``.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    out = np.zeros(q.shape)
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k))):
        if q1 == q0:
            continue
        o, l = attention(*(x[None].transpose(0, 2, 1, 3) for x in (q[q0:q1], k[k0:k1], v[k0:k1])),
                         return_lse=True, **_varlen_options(options, i, q1 - q0, k1 - k0))
        out[q0:q1] = o[0].transpose(1, 0, 2)
        lse[:, q0:q1] = l[0]
    return (out, lse) if return_lse else out


def attention_varlen_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, out=None, lse=None, *,
                              return_dbias=False, **options):
    """Float64 reference of :func:`fastattn.attention_varlen_backward`: (dq, dk, dv) in the packed layout,
    and with ``return_dbias`` the bias gradient in the shape of ``bias``."""
    dout, q, k, v = _f64(dout), _f64(q), _f64(k), _f64(v)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    bias = options.get("bias")
    dbias = np.zeros(np.shape(bias)) if return_dbias else None
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(_segments(cu_seqlens_q), _segments(cu_seqlens_k))):
        if q1 == q0 or k1 == k0:
            continue
        heads = [x[None].transpose(0, 2, 1, 3) for x in (dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1])]
        g = attention_backward(*heads, return_dbias=return_dbias, **_varlen_options(options, i, q1 - q0, k1 - k0))
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(1, 0, 2) for x in g[:3])
        if return_dbias:
            varlen_corner(dbias, i, q1 - q0, k1 - k0)[...] += g[3]
    return (dq, dk, dv, dbias) if return_dbias else (dq, dk, dv)


def naive_attention(q, k, v, *, causal=False, scale=None):
    """Plain NumPy attention in the inputs' precision: the speed peer for benchmarks."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(scale)
    if causal:
        s = np.where(visible_mask(q.shape[2], k.shape[2], causal=True), s, -np.inf)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


# --- partial states and paged caches ------------------------------------------

def merge_attention_states(outs, lses):
    """Float64 reference of :func:`fastattn.merge_attention_states`: (out, lse)."""
    outs = np.stack([_f64(o) for o in outs])
    lses = np.stack([_f64(x) for x in lses])
    top = lses.max(axis=0, initial=-np.inf)
    seen = np.isfinite(top)
    w = np.where(seen, np.exp(lses - np.where(seen, top, 0.0)), 0.0)
    total = w.sum(axis=0)
    out = (w[..., None] * outs).sum(axis=0) / np.where(seen, total, 1.0)[..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(seen, top + np.log(np.where(seen, total, 1.0)), -np.inf)
    return out, lse


def _per_head(scale, heads):
    return np.broadcast_to(np.asarray(scale, dtype=np.float64), (heads,))


def gather_kv(cache, block_table, seq_len, scale=1.0):
    """Keys (or values) ``[Hkv, seq_len, D]`` of one sequence from a paged cache, as float64.

    Token ``t`` lives in block ``block_table[t // block_size]``, row
    ``t % block_size``; ``scale`` (a float or per-KV-head ``[Hkv]``) multiplies
    the stored values, as fp8 caches are decoded.
    """
    cache = _f64(cache)
    block_size, heads = cache.shape[1], cache.shape[2]
    t = np.arange(int(seq_len))
    rows = cache[np.asarray(block_table)[t // block_size], t % block_size]  # [L, Hkv, D]
    return rows.transpose(1, 0, 2) * _per_head(scale, heads)[:, None, None]


def _seq_lens(seq_lens, batch):
    return np.broadcast_to(np.asarray(seq_lens, dtype=np.int64), (batch,))


def _sequence_options(options, b):
    slopes = options.get("alibi_slopes")
    if slopes is not None and np.ndim(slopes) == 2:
        options = dict(options, alibi_slopes=np.asarray(slopes)[b])
    return options


def paged_attention(q, k_cache, v_cache, block_table, seq_lens, *, q_scale=1.0, k_scale=1.0,
                    v_scale=1.0, return_lse=False, **options):
    """Float64 reference of :func:`fastattn.paged_attention` (and of the fp8 variant).

    Each sequence's keys are gathered into a dense array and passed to
    :func:`attention`; a sequence of length 0 gets zeros and ``lse = -inf``.
    """
    q = _f64(q) * float(q_scale)
    b_count, hq, sq, d = q.shape
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:3], -np.inf)
    for b, length in enumerate(_seq_lens(seq_lens, b_count)):
        if length == 0:
            continue
        k = gather_kv(k_cache, block_table[b], length, k_scale)[None]
        v = gather_kv(v_cache, block_table[b], length, v_scale)[None]
        out[b], lse[b] = (x[0] for x in attention(q[b:b + 1], k, v, return_lse=True,
                                                  **_sequence_options(options, b)))
    return (out, lse) if return_lse else out


def paged_attention_backward(dout, q, k_cache, v_cache, out=None, lse=None, block_table=None,
                             seq_lens=None, **options):
    """Float64 reference of :func:`fastattn.paged_attention_backward`: (dq, dk_cache, dv_cache).

    A dense backward per sequence on its gathered keys, with the key gradients
    scattered back into whole-cache arrays by ``np.add.at`` (so a block that
    several sequences read gets the sum of their contributions).
    """
    dout, q = _f64(dout), _f64(q)
    dq = np.zeros(q.shape)
    dk_cache, dv_cache = np.zeros(np.shape(k_cache)), np.zeros(np.shape(v_cache))
    block_size = dk_cache.shape[1]
    for b, length in enumerate(_seq_lens(seq_lens, q.shape[0])):
        if length == 0:
            continue
        k = gather_kv(k_cache, block_table[b], length)[None]
        v = gather_kv(v_cache, block_table[b], length)[None]
        dq[b:b + 1], dk, dv = attention_backward(dout[b:b + 1], q[b:b + 1], k, v,
                                                 **_sequence_options(options, b))
        t = np.arange(length)
        blocks, rows = np.asarray(block_table[b])[t // block_size], t % block_size
        np.add.at(dk_cache, (blocks, rows), dk[0].transpose(1, 0, 2))
        np.add.at(dv_cache, (blocks, rows), dv[0].transpose(1, 0, 2))
    return dq, dk_cache, dv_cache


def rotary(x, cos, sin, *, positions=None, interleaved=False, inverse=False):
    """Float64 reference of :func:`fastattn.rotary` (``inverse=True``: of :func:`fastattn.rotary_backward`).

    Builds the rotation explicitly: the pairs ``(i, i + R/2)`` (or ``(2i, 2i + 1)``
    interleaved) of the first ``R = 2 * cos.shape[1]`` features of the row at
    position ``p`` are multiplied by the 2x2 matrix ``[[c, -s], [s, c]]``.
    """
    x = _f64(x)
    cos, sin = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    b, h, s, d = x.shape
    half = cos.shape[1]
    pos = np.arange(s) if positions is None else np.asarray(positions)
    pos = np.broadcast_to(pos.reshape(-1, s), (b, s))
    c = cos[pos][:, None]  # [B, 1, S, half]
    n = -sin[pos][:, None] if inverse else sin[pos][:, None]
    first = np.arange(0, 2 * half, 2) if interleaved else np.arange(half)
    second = first + 1 if interleaved else first + half
    out = x.copy()
    u, v = x[..., first], x[..., second]
    out[..., first] = u * c - v * n
    out[..., second] = v * c + u * n
    return out
