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


def _scores(q, k, scale, softcap, alibi_slopes, causal, window):
    """Return (scores, capped, mask): capped is the pre-ALiBi softcapped score."""
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
    mask = visible_mask(sq, sk, causal=causal, window=window)
    s = np.where(mask, s, -np.inf)
    return s, capped, mask


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_lse=False):
    """Float64 reference of :func:`fastattn.attention`; returns float64 arrays."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s, _, _ = _scores(q, k, scale, softcap, alibi_slopes, causal, window)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    p = np.exp(s - np.where(seen, row_max, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    p = np.where(seen, p / np.where(seen, total, 1.0), 0.0)
    vv = np.repeat(v, q.shape[1] // v.shape[1], axis=1)
    out = p @ vv
    with np.errstate(divide="ignore"):
        lse = np.where(seen, row_max + np.log(total), -np.inf)[..., 0]
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out=None, lse=None, *, causal=False, scale=None,
                       window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Float64 reference of :func:`fastattn.attention_backward`: (dq, dk, dv).

    ``out`` and ``lse`` are accepted for signature parity and ignored: the
    reference recomputes them in float64.
    """
    dout, q, k, v = _f64(dout), _f64(q), _f64(k), _f64(v)
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    s, capped, _ = _scores(q, k, scale, softcap, alibi_slopes, causal, window)
    row_max = s.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    p = np.exp(s - np.where(seen, row_max, 0.0))
    p = np.where(seen, p / np.where(seen, p.sum(axis=-1, keepdims=True), 1.0), 0.0)
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    dv_full = p.transpose(0, 1, 3, 2) @ dout
    dp = dout @ vv.transpose(0, 1, 3, 2)
    o = p @ vv
    delta = (dout * o).sum(axis=-1, keepdims=True)
    ds = p * (dp - delta)
    if softcap:
        ds = ds * (1.0 - (capped / softcap) ** 2)
    dq = scale * ds @ kk
    dk_full = scale * ds.transpose(0, 1, 3, 2) @ q
    b, _, sk, d = k.shape
    dk = dk_full.reshape(b, hkv, group, sk, d).sum(axis=2)
    dv = dv_full.reshape(b, hkv, group, sk, d).sum(axis=2)
    return dq, dk, dv


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
