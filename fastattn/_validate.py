"""Argument checks shared by every family.

Each public function calls one ``*_args`` function here.  It raises
``ValueError`` (bad value or shape) or ``TypeError`` (bad type, dtype or
device) with the argument's name first, then what was expected, then what
came; and it returns a small frozen spec so kernels receive plain numbers.
"""
import math
from dataclasses import dataclass

import numpy as np

from . import _dtypes
from ._dispatch import as_array


@dataclass(frozen=True)
class AttentionSpec:
    """Resolved sizes and options of one attention call."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    dtype: np.dtype
    scale: float
    window_left: int
    window_right: int
    softcap: float

    @property
    def group(self):
        return self.heads_q // self.heads_kv

    @property
    def codec(self):
        return _dtypes.codec_of(self.dtype)

    @property
    def accum_dtype(self):
        return _dtypes.accum_dtype(self.dtype)


def _shape(name, x, rank, layout):
    if len(x.shape) != rank:
        raise ValueError(f"{name}: expected a {rank}-d array {layout}, got shape {tuple(x.shape)}")
    return tuple(int(s) for s in x.shape)


def float_dtype(name, x):
    """Check that x holds float32/float64/float16/bfloat16 and return its dtype."""
    dtype = np.dtype(x.dtype)
    if dtype not in _dtypes.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {dtype}")
    return dtype


def same_dtype(dtype, **arrays):
    for name, x in arrays.items():
        if np.dtype(x.dtype) != dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of q), got {np.dtype(x.dtype)}")


def scale_value(scale, head_dim):
    """Resolve the softmax scale: 1/sqrt(D) by default, else a finite float."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    return float(scale)


def window_values(window, causal):
    """Normalise (left, right) with -1 = unbounded; causal sets right to 0 (as FlashAttention 2)."""
    if window is None:
        window = (-1, -1)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise TypeError(f"window: expected a pair (left, right) of ints, got {window!r}") from None
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"window: expected int {side} size, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window: expected {side} size >= -1 (-1 = unbounded), got {w}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if causal:
        right = 0
    return int(left), int(right)


def softcap_value(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap: expected a float (0 = off), got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap: expected a finite float >= 0 (0 = off), got {softcap}")
    return float(softcap)


def attention_args(q, k, v, *, causal, scale, window, softcap, alibi_slopes):
    """Check the arguments of :func:`fastattn.attention`; return (q, k, v, slopes, spec)."""
    q, k, v = as_array("q", q), as_array("k", k), as_array("v", v)
    b, hq, sq, d = _shape("q", q, 4, "[B, Hq, Sq, D]")
    kshape = _shape("k", k, 4, "[B, Hkv, Sk, D]")
    if kshape[0] != b or kshape[3] != d:
        raise ValueError(f"k: expected shape [B, Hkv, Sk, D] with B={b} and D={d}, got {kshape}")
    hkv, sk = kshape[1], kshape[2]
    vshape = _shape("v", v, 4, "[B, Hkv, Sk, D]")
    if vshape != kshape:
        raise ValueError(f"v: expected the shape of k {kshape}, got {vshape}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k: expected a number of KV heads that divides Hq={hq}, got Hkv={hkv}")
    if d == 0:
        raise ValueError(f"q: expected head dimension D >= 1, got shape {(b, hq, sq, d)}")
    dtype = float_dtype("q", q)
    same_dtype(dtype, k=k, v=v)
    slopes = alibi_values(alibi_slopes, b, hq)
    spec = AttentionSpec(b, hq, hkv, sq, sk, d, dtype, scale_value(scale, d),
                         *window_values(window, causal), softcap_value(softcap))
    return q, k, v, slopes, spec


def alibi_values(alibi_slopes, b, hq):
    """ALiBi slopes as given ([Hq] or [B, Hq], float32/float64), or None."""
    if alibi_slopes is None:
        return None
    slopes = as_array("alibi_slopes", alibi_slopes)
    if tuple(slopes.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"alibi_slopes: expected shape [Hq] = ({hq},) or [B, Hq] = ({b}, {hq}), "
                         f"got {tuple(slopes.shape)}")
    if np.dtype(slopes.dtype) not in (np.float32, np.float64):
        raise TypeError(f"alibi_slopes: expected float32 or float64, got {np.dtype(slopes.dtype)}")
    return slopes


def attention_backward_args(dout, q, k, v, out, lse, **options):
    """Check :func:`fastattn.attention_backward` arguments; return (..., slopes, spec)."""
    q, k, v, slopes, spec = attention_args(q, k, v, **options)
    dout, out, lse = as_array("dout", dout), as_array("out", out), as_array("lse", lse)
    qshape = (spec.batch, spec.heads_q, spec.seq_q, spec.head_dim)
    for name, x in (("dout", dout), ("out", out)):
        if tuple(x.shape) != qshape:
            raise ValueError(f"{name}: expected the shape of q {qshape}, got {tuple(x.shape)}")
    same_dtype(spec.dtype, dout=dout, out=out)
    if tuple(lse.shape) != qshape[:3]:
        raise ValueError(f"lse: expected shape [B, Hq, Sq] = {qshape[:3]}, got {tuple(lse.shape)}")
    if np.dtype(lse.dtype) != spec.accum_dtype:
        raise TypeError(f"lse: expected dtype {spec.accum_dtype} (as returned with return_lse=True), "
                        f"got {np.dtype(lse.dtype)}")
    return dout, q, k, v, out, lse, slopes, spec
