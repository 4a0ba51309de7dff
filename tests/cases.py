"""Named attention cases shared by the tests: shapes, options, dtypes and their inputs.

A case reads like its id, ``gqa-8-2-sq113-sk203-d40-causal-bf16``: the head
layout (mha / gqa / mqa), Hq and Hkv, the sequence lengths, the head dimension,
the option set and the dtype.
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from fastattn import reference

F32, F64, F16, BF16 = (np.dtype(t) for t in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16))
DTYPE_ID = {F32: "f32", F64: "f64", F16: "f16", BF16: "bf16"}


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def id(self):
        kind = "mha" if self.heads_q == self.heads_kv else "mqa" if self.heads_kv == 1 else "gqa"
        batch = f"b{self.batch}-" if self.batch != 2 else ""
        return (f"{batch}{kind}-{self.heads_q}-{self.heads_kv}-sq{self.seq_q}-sk{self.seq_k}"
                f"-d{self.head_dim}")

    @property
    def q(self):
        return (self.batch, self.heads_q, self.seq_q, self.head_dim)

    @property
    def kv(self):
        return (self.batch, self.heads_kv, self.seq_k, self.head_dim)


def _alibi_per_head(shape, rng):
    # the standard geometric ALiBi slopes, as float32
    h = np.arange(1, shape.heads_q + 1)
    return (2.0 ** (-8.0 * h / shape.heads_q)).astype(np.float32)


def _alibi_per_batch_head(shape, rng):
    return rng.uniform(0.0, 0.3, size=(shape.batch, shape.heads_q))


#: Option sets by name: each maps (shape, rng) to keyword arguments of fastattn.attention.
OPTIONS = {
    "plain": lambda s, rng: {},
    "causal": lambda s, rng: {"causal": True},
    "window-32-8": lambda s, rng: {"window": (32, 8)},
    "window-3-1": lambda s, rng: {"window": (3, 1)},
    "window-m1-0": lambda s, rng: {"window": (-1, 0)},
    "window-0-m1": lambda s, rng: {"window": (0, -1)},
    "softcap": lambda s, rng: {"softcap": 1.5},
    "softcap-30": lambda s, rng: {"softcap": 30.0},     # Gemma-sized: tanh nearly linear
    "scale": lambda s, rng: {"scale": 0.37},
    "alibi-h": lambda s, rng: {"alibi_slopes": _alibi_per_head(s, rng)},
    "alibi-bh": lambda s, rng: {"alibi_slopes": _alibi_per_batch_head(s, rng)},
    "all": lambda s, rng: {"causal": True, "window": (24, -1), "softcap": 2.0, "scale": 0.3,
                           "alibi_slopes": _alibi_per_batch_head(s, rng)},
}


@dataclass(frozen=True)
class Case:
    shape: Shape
    option: str
    dtype: np.dtype

    @property
    def id(self):
        return f"{self.shape.id}-{self.option}-{DTYPE_ID[self.dtype]}"

    def options(self, rng):
        return OPTIONS[self.option](self.shape, rng)


def random(shape, dtype, rng):
    """Standard normal values rounded to dtype."""
    return rng.standard_normal(shape).astype(dtype)


def inputs(case, rng):
    """(q, k, v, options) of a case, as NumPy arrays."""
    s = case.shape
    return random(s.q, case.dtype, rng), random(s.kv, case.dtype, rng), random(s.kv, case.dtype, rng), \
        case.options(rng)


def accum(dtype):
    """The dtype of lse for inputs of dtype."""
    return F64 if np.dtype(dtype) == F64 else F32


# FlashAttention's test grid: sequence lengths, head layouts and head dims, not
# as a full product but as a covering set: every (Sq, Sk) pair meets every
# option, and every option meets every dtype, head layout and head dim.
SEQ_LENS = [(1, 1), (1, 239), (3, 799), (113, 203), (127, 256), (239, 1), (200, 100)]
HEADS = [(4, 4), (8, 2), (6, 1)]
HEAD_DIMS = [16, 40, 64, 128]
DTYPES = [F32, F64, F16, BF16]

CPU_CASES = [
    Case(Shape(2, *HEADS[(i + 2 * j) % 3], sq, sk, HEAD_DIMS[(i + j // 2) % 4]), option,
         DTYPES[(i + j) % 4])
    for i, (sq, sk) in enumerate(SEQ_LENS)
    for j, option in enumerate(OPTIONS)
] + [
    # odd and large head dims
    Case(Shape(1, 4, 2, 65, 97, 80), "all", F32),
    Case(Shape(1, 4, 2, 65, 97, 80), "window-3-1", F16),
    Case(Shape(2, 3, 1, 41, 130, 111), "causal", BF16),
    Case(Shape(1, 2, 2, 33, 70, 111), "softcap", F64),
    Case(Shape(1, 2, 1, 70, 130, 256), "alibi-h", F16),
    Case(Shape(1, 2, 2, 17, 40, 256), "all", F32),
    # float32 is where the error of the softcap's tanh shows
    Case(Shape(2, 8, 2, 113, 203, 64), "softcap-30", F32),
]

# The simulator runs each GPU thread as a Python thread: tiny shapes only.
CUDA_SHAPES = [
    Shape(1, 2, 2, 1, 1, 8),
    Shape(2, 4, 2, 1, 13, 16),
    Shape(1, 4, 1, 3, 17, 13),
    Shape(1, 2, 2, 13, 9, 16),
    Shape(2, 2, 1, 9, 13, 8),
    Shape(1, 4, 2, 17, 4, 16),
    Shape(1, 2, 1, 19, 20, 5),
]

CUDA_CASES = [
    Case(CUDA_SHAPES[j % len(CUDA_SHAPES)], option, DTYPES[j % 4])
    for j, option in enumerate(OPTIONS)
] + [Case(CUDA_SHAPES[(j + 3) % len(CUDA_SHAPES)], "all", dtype)
     for j, dtype in enumerate(DTYPES) if dtype != DTYPES[(len(OPTIONS) - 1) % 4]]


def backward_reference(dout, q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
                       alibi_slopes=None, bias=None, mask=None):
    """The reference gradients and, for each, the largest sum of absolute terms.

    ``dq = scale * sum_j p_ij (dp_ij - delta_i) g_ij k_j`` (``g`` the softcap
    derivative) cancels exactly when a row sees one key; its rounding error
    scales with ``scale * sum_j p_ij (|dp_ij| + |delta_i|) |g_ij| |k_j|``.
    Likewise for dk, and ``sum_i p_ij |dout_i|`` for dv; with a ``bias``,
    ``dbias`` (summed over its broadcast axes) comes fourth, its magnitude the
    same sums of ``p_ij (|dp_ij| + |delta_i|)``.
    Returns ``((dq, dk, dv[, dbias]), (mag_dq, mag_dk, mag_dv[, mag_dbias]))`` with float magnitudes.
    """
    options = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    if bias is not None or mask is not None:
        options.update(bias=bias, mask=mask)
    grads = reference.attention_backward(dout, q, k, v, return_dbias=bias is not None, **options)
    dout, q, k, v = (np.asarray(x).astype(np.float64) for x in (dout, q, k, v))
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    kk, vv = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    x = np.einsum("bhid,bhjd->bhij", q, kk) * scale
    capped = softcap * np.tanh(x / softcap) if softcap else x
    s = capped.copy()
    if alibi_slopes is not None:
        slopes = np.broadcast_to(np.asarray(alibi_slopes, dtype=np.float64), (b, hq))
        s -= slopes[:, :, None, None] * np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :])
    if bias is not None:
        s = s + np.asarray(bias).astype(np.float64)
    out, lse = reference.attention(q, k, v, return_lse=True, **options)
    seen = np.isfinite(lse)[..., None]
    visible = reference.visible_mask(sq, sk, causal=causal, window=window)
    if mask is not None:
        visible = visible & np.asarray(mask, bool)
    with np.errstate(invalid="ignore"):  # -inf biases on rows that see nothing
        p = np.where(seen & visible, np.exp(s - np.where(seen, lse[..., None], 0.0)), 0.0)
    dp = dout @ vv.swapaxes(-1, -2)
    delta = (dout * out).sum(axis=-1, keepdims=True)
    grad = np.abs(1.0 - (capped / softcap) ** 2) if softcap else 1.0
    terms = p * (np.abs(dp) + np.abs(delta)) * grad
    mag_dq = scale * terms @ np.abs(kk)
    mag_dk = (scale * terms.swapaxes(-1, -2) @ np.abs(q)).reshape(b, hkv, group, sk, d).sum(axis=2)
    mag_dv = (p.swapaxes(-1, -2) @ np.abs(dout)).reshape(b, hkv, group, sk, d).sum(axis=2)
    mags = [mag_dq, mag_dk, mag_dv]
    if bias is not None:
        mags.append(reference._reduce_to(p * (np.abs(dp) + np.abs(delta)), np.shape(bias)))
    return grads, tuple(float(m.max(initial=0.0)) for m in mags)
