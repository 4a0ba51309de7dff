"""Argument checks shared by every family.

Each public function calls one ``*_args`` function here.  It raises
``ValueError`` (bad value or shape) or ``TypeError`` (bad type, dtype or
device) with the argument's name first, then what was expected, then what
came; and it returns a small frozen spec so kernels receive plain numbers.
"""
import math
from dataclasses import dataclass, replace

import numpy as np

from . import _dtypes
from ._dispatch import as_array, is_cuda_array


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
    #: Private (forward only): moves every row's diagonal ``shift`` keys right, so a
    #: block of a bigger problem sees its global masks and ALiBi distances.
    shift: int = 0

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
    if not _dtypes.is_float(dtype):
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


@dataclass(frozen=True)
class Extra:
    """An additive ``bias`` and a boolean ``mask`` of one attention call, each 4-d or None.

    Both are the caller's arrays with ones prepended to the shape (a view, never
    broadcast out): each axis is 1 or the size of ``[B, Hq, Sq, Sk]``.
    ``bias_shape`` is the shape the caller gave (the shape of ``dbias``).
    """

    bias: object = None
    mask: object = None
    bias_shape: tuple = ()

    def __bool__(self):
        return self.bias is not None or self.mask is not None

    def sequence(self, b, sq, sk):
        """The Extra of sequence ``b`` of a packed batch (this one in padded coordinates): batch ``b``,
        rows ``:sq``, keys ``:sk``, axes of length 1 kept."""
        bias, mask = corner(self.bias, b, sq, sk), corner(self.mask, b, sq, sk)
        return Extra(bias, mask, () if bias is None else tuple(int(n) for n in bias.shape))


def corner(x, b, sq, sk):
    """Sequence ``b``'s part of a 4-d bias or mask of a padded batch (axes of length 1 kept); None stays None."""
    if x is None:
        return None
    i = b if x.shape[0] > 1 else 0
    return x[i:i + 1, :, :(sq if x.shape[2] > 1 else 1), :(sk if x.shape[3] > 1 else 1)]


def sequence_args(spec, extra, slopes, b, sq, sk):
    """``(spec, extra, slopes)`` of sequence ``b`` of a packed batch, alone."""
    if slopes is not None and len(slopes.shape) == 2:
        slopes = slopes[b]
    return replace(spec, batch=1, seq_q=sq, seq_k=sk), extra.sequence(b, sq, sk), slopes


def _as_4d(name, x, full):
    """``x`` reshaped to 4-d with leading ones; ValueError unless it broadcasts to ``full``."""
    shape = tuple(int(s) for s in x.shape)
    if len(shape) > 4:
        raise ValueError(f"{name}: expected at most 4 dims broadcastable to [B, Hq, Sq, Sk] = {full}, "
                         f"got shape {shape}")
    padded = (1,) * (4 - len(shape)) + shape
    for have, want in zip(padded, full):
        if have not in (1, want):
            raise ValueError(f"{name}: expected a shape broadcastable to [B, Hq, Sq, Sk] = {full}, "
                             f"got {shape}")
    if padded == shape:
        return x
    if is_cuda_array(x) and not x.is_c_contiguous():  # numba reshapes only contiguous device arrays
        from numba import cuda

        x = cuda.to_device(np.ascontiguousarray(x.copy_to_host()))
    return x.reshape(padded)


def element_strides(shape):
    """Element strides of a C-contiguous array of ``shape``, 0 on axes of length 1 (read broadcast)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step if n > 1 else 0)
        step *= n
    return tuple(strides[::-1])


def extra_values(bias, mask, spec):
    """Check ``bias`` (float32 or the dtype of q) and ``mask`` (bool) against ``spec``; return an :class:`Extra`."""
    full = (spec.batch, spec.heads_q, spec.seq_q, spec.seq_k)
    if bias is not None:
        bias = as_array("bias", bias)
        dtype = np.dtype(bias.dtype)
        if dtype not in (np.dtype(np.float32), spec.dtype):
            wanted = "float32" if spec.dtype == np.float32 else f"float32 or {spec.dtype} (the dtype of q)"
            raise TypeError(f"bias: expected {wanted}, got {dtype}")
    if mask is not None:
        mask = as_array("mask", mask)
        if np.dtype(mask.dtype) != np.bool_:
            raise TypeError(f"mask: expected a boolean array (True = the key takes part), got "
                            f"{np.dtype(mask.dtype)}; pass an additive float mask as bias=")
    return Extra(None if bias is None else _as_4d("bias", bias, full),
                 None if mask is None else _as_4d("mask", mask, full),
                 () if bias is None else tuple(int(s) for s in bias.shape))


def forward_outputs(dout, out, lse, spec):
    """Check dout, out (shape and dtype of q) and lse ([B, Hq, Sq], accumulation dtype) of a backward."""
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
    return dout, out, lse


def attention_backward_args(dout, q, k, v, out, lse, **options):
    """Check :func:`fastattn.attention_backward` arguments; return (..., slopes, spec)."""
    q, k, v, slopes, spec = attention_args(q, k, v, **options)
    dout, out, lse = forward_outputs(dout, out, lse, spec)
    return dout, q, k, v, out, lse, slopes, spec


# --- paged attention -------------------------------------------------------------

@dataclass(frozen=True)
class PagedSpec:
    """Resolved sizes and options of one paged attention call."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    head_dim: int
    num_blocks: int
    block_size: int
    dtype: np.dtype         #: of q (and of out, unless fp8 output)
    cache_dtype: np.dtype
    scale: float
    window_left: int
    window_right: int
    softcap: float
    max_seq_len: int

    @property
    def group(self):
        return self.heads_q // self.heads_kv

    @property
    def accum_dtype(self):
        return _dtypes.accum_dtype(self.dtype)


def host_array(x):
    """A NumPy copy of a (small) index array that may live on the GPU."""
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


def _integer_array(name, x, expected):
    host = host_array(x)
    if host.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an integer array {expected}, got dtype {host.dtype}")
    return host


def cache_shapes(k_cache, v_cache, heads_kv=None, head_dim=None):
    """Check [num_blocks, block_size, Hkv, D] caches; return their shape."""
    shape = _shape("k_cache", k_cache, 4, "[num_blocks, block_size, Hkv, D]")
    if (head_dim is not None and shape[3] != head_dim) or (heads_kv is not None and shape[2] != heads_kv):
        want = ", ".join(f"{n}={v}" for n, v in (("Hkv", heads_kv), ("D", head_dim)) if v is not None)
        raise ValueError(f"k_cache: expected shape [num_blocks, block_size, Hkv, D] with {want}, got {shape}")
    vshape = _shape("v_cache", v_cache, 4, "[num_blocks, block_size, Hkv, D]")
    if vshape != shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {shape}, got {vshape}")
    if shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"k_cache: expected block_size >= 1 and Hkv >= 1, got shape {shape}")
    if np.dtype(v_cache.dtype) != np.dtype(k_cache.dtype):
        raise TypeError(f"v_cache: expected the dtype of k_cache ({np.dtype(k_cache.dtype)}), "
                        f"got {np.dtype(v_cache.dtype)}")
    return shape


def cache_dtype(k_cache, fp8, fp8_hint=True):
    """The caches' dtype: fp8 formats for the fp8 functions, float formats otherwise."""
    dtype = np.dtype(k_cache.dtype)
    if fp8 and not _dtypes.is_fp8(dtype):
        raise TypeError(f"k_cache: expected float8_e4m3fn or float8_e5m2 (ml_dtypes), got {dtype}")
    if not fp8 and not _dtypes.is_float(dtype):
        extra = " (use paged_attention_fp8 for fp8 caches)" if fp8_hint and _dtypes.is_fp8(dtype) else ""
        raise TypeError(f"k_cache: expected float32, float64, float16 or bfloat16{extra}, got {dtype}")
    return dtype


def seq_len_values(seq_lens, batch, seq_q, capacity):
    """Lengths [B] as int32: an int for all, or an integer array; 0 or in [Sq, capacity]."""
    if isinstance(seq_lens, (int, np.integer)) and not isinstance(seq_lens, bool):
        lens = np.full(batch, int(seq_lens), np.int64)
    else:
        lens = _integer_array("seq_lens", seq_lens, "[B] or an int")
        if lens.shape != (batch,):
            raise ValueError(f"seq_lens: expected shape [B] = ({batch},) or an int, got {lens.shape}")
    checks = ((lens < 0, "lengths >= 0"),
              (lens > capacity, f"lengths <= {capacity} (block_table columns x block_size)"),
              ((lens > 0) & (lens < seq_q),
               f"lengths of 0 or >= Sq={seq_q} (the queries are each sequence's last Sq tokens)"))
    for bad, expected in checks:
        if bad.any():
            b = int(np.argmax(bad))
            raise ValueError(f"seq_lens: expected {expected}, got {int(lens[b])} for sequence {b}")
    return lens.astype(np.int32)


def block_table_values(block_table, batch, num_blocks, block_size, seq_lens=None):
    """The table [B, max_blocks] as int32, its read entries checked against the cache."""
    table = _integer_array("block_table", block_table, "[B, max_blocks]")
    if table.ndim != 2 or table.shape[0] != batch:
        raise ValueError(f"block_table: expected shape [B, max_blocks] with B={batch}, got {table.shape}")
    if seq_lens is not None:
        used = -(-seq_lens.astype(np.int64) // block_size)
        read = np.arange(table.shape[1])[None, :] < used[:, None]
        bad = read & ((table < 0) | (table >= num_blocks))
        if bad.any():
            b, j = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"block_table: expected entries in [0, {num_blocks}) (num_blocks) for the "
                             f"blocks that are read, got {int(table[b, j])} at [{b}, {j}]")
    return np.ascontiguousarray(table, dtype=np.int32)


def device_index_values(block_table, seq_lens, batch, seq_q, num_blocks, block_size, capacity):
    """The checks of :func:`seq_len_values` and :func:`block_table_values` for a table on the GPU.

    The table is checked where it lives: one small kernel finds the first bad
    length and the first bad entry that is read, and the longest sequence; the
    only transfer back is those three numbers (and, on error, the bad value).
    Returns ``(table, lens, max_len)`` with ``table`` and ``lens`` device arrays.
    """
    from .cuda.paged import check_indices, device_ints

    if np.dtype(block_table.dtype).kind not in "iu":
        raise TypeError(f"block_table: expected an integer array [B, max_blocks], got dtype "
                        f"{np.dtype(block_table.dtype)}")
    if tuple(block_table.shape)[0] != batch:
        raise ValueError(f"block_table: expected shape [B, max_blocks] with B={batch}, "
                         f"got {tuple(block_table.shape)}")
    if is_cuda_array(seq_lens):
        if np.dtype(seq_lens.dtype).kind not in "iu":
            raise TypeError(f"seq_lens: expected an integer array [B] or an int, got dtype {np.dtype(seq_lens.dtype)}")
        if tuple(seq_lens.shape) != (batch,):
            raise ValueError(f"seq_lens: expected shape [B] = ({batch},) or an int, got {tuple(seq_lens.shape)}")
        lens = device_ints(seq_lens)
    else:
        lens = device_ints(seq_len_values(seq_lens, batch, seq_q, capacity))
    table = device_ints(block_table)
    bad_len, bad_entry, max_len = check_indices(table, lens, num_blocks, block_size, seq_q, capacity)
    if bad_len < batch:
        n = int(lens[bad_len:bad_len + 1].copy_to_host()[0])
        expected = ("lengths >= 0" if n < 0 else f"lengths <= {capacity} (block_table columns x block_size)"
                    if n > capacity else
                    f"lengths of 0 or >= Sq={seq_q} (the queries are each sequence's last Sq tokens)")
        raise ValueError(f"seq_lens: expected {expected}, got {n} for sequence {bad_len}")
    width = tuple(table.shape)[1]
    if bad_entry < batch * width:
        b, j = divmod(bad_entry, width)
        value = int(table[b, j:j + 1].copy_to_host()[0])
        raise ValueError(f"block_table: expected entries in [0, {num_blocks}) (num_blocks) for the "
                         f"blocks that are read, got {value} at [{b}, {j}]")
    return table, lens, max_len


def paged_args(q, k_cache, v_cache, block_table, seq_lens, *, causal, scale, window, softcap,
               alibi_slopes, fp8=False, fp8_hint=True):
    """Check paged attention arguments; return (q, k_cache, v_cache, table, lens, slopes, spec).

    ``table`` and ``lens`` are checked host (NumPy int32) copies.
    """
    q, k_cache, v_cache = as_array("q", q), as_array("k_cache", k_cache), as_array("v_cache", v_cache)
    block_table = as_array("block_table", block_table)
    b, hq, sq, d = _shape("q", q, 4, "[B, Hq, Sq, D]")
    num_blocks, block_size, hkv, _ = cache_shapes(k_cache, v_cache, head_dim=d)
    if hq % hkv:
        raise ValueError(f"k_cache: expected a number of KV heads that divides Hq={hq}, got Hkv={hkv}")
    if d == 0:
        raise ValueError(f"q: expected head dimension D >= 1, got shape {(b, hq, sq, d)}")
    kv_dtype = cache_dtype(k_cache, fp8, fp8_hint)
    if fp8:
        dtype = np.dtype(q.dtype)
        if not (_dtypes.is_fp8(dtype) or _dtypes.is_float(dtype)) or dtype == np.float64:
            raise TypeError(f"q: expected float32, float16, bfloat16 or fp8, got {dtype}")
    else:
        dtype = float_dtype("q", q)
        if kv_dtype != dtype:
            raise TypeError(f"k_cache: expected dtype {dtype} (the dtype of q), got {kv_dtype}")
    capacity = _shape("block_table", block_table, 2, "[B, max_blocks]")[1] * block_size
    if is_cuda_array(block_table):
        table, lens, max_len = device_index_values(block_table, seq_lens, b, sq, num_blocks, block_size, capacity)
    else:
        lens = seq_len_values(seq_lens, b, sq, capacity)
        table = block_table_values(block_table, b, num_blocks, block_size, lens)
        max_len = int(lens.max(initial=0))
    slopes = alibi_values(alibi_slopes, b, hq)
    spec = PagedSpec(b, hq, hkv, sq, d, num_blocks, block_size, dtype, kv_dtype, scale_value(scale, d),
                     *window_values(window, causal), softcap_value(softcap), max_len)
    return q, k_cache, v_cache, table, lens, slopes, spec


def positive_scale(name, value, heads=None):
    """A float > 0, or (with ``heads``) a float or per-KV-head array [Hkv]; returns float32 [Hkv]."""
    if heads is not None and not np.isscalar(value) and np.ndim(host_array(value)) == 1:
        values = host_array(value)
        if values.shape != (heads,):
            raise ValueError(f"{name}: expected a float or shape [Hkv] = ({heads},), got {values.shape}")
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float{' or [Hkv] array' if heads else ''}, "
                        f"got {type(value).__name__}")
    else:
        values = np.full(heads or 1, value, np.float64)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected float values, got dtype {values.dtype}")
    bad = ~(values > 0) | ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{name}: expected finite scales > 0, got {values[bad][0]}")
    return values.astype(np.float32) if heads else float(values[0])


def paged_backward_args(dout, q, k_cache, v_cache, out, lse, block_table, seq_lens, *, causal, scale,
                        window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """Check paged backward arguments; return (dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec)."""
    q, k_cache, v_cache, table, lens, slopes, spec = paged_args(
        q, k_cache, v_cache, block_table, seq_lens, causal=causal, scale=scale, window=window,
        softcap=softcap, alibi_slopes=alibi_slopes, fp8_hint=False)  # there is no fp8 backward to point to
    dout, out, lse = forward_outputs(dout, out, lse, spec)
    return dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec


def write_kv_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    """Check write_kv_cache arguments; return (k, v, slots, k_scale[Hkv], v_scale[Hkv])."""
    k, v = as_array("k", k), as_array("v", v)
    num_blocks, block_size, hkv, d = cache_shapes(k_cache, v_cache)
    t = _shape("k", k, 3, "[T, Hkv, D]")[0]
    if tuple(k.shape) != (t, hkv, d):
        raise ValueError(f"k: expected shape [T, Hkv, D] with Hkv={hkv} and D={d}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    dtype = float_dtype("k", k)
    float_dtype("v", v)
    kv_dtype = np.dtype(k_cache.dtype)
    if not (_dtypes.is_float(kv_dtype) or _dtypes.is_fp8(kv_dtype)):
        raise TypeError(f"k_cache: expected a float or fp8 dtype, got {kv_dtype}")
    cache_dtype(v_cache, _dtypes.is_fp8(kv_dtype))
    if np.dtype(v.dtype) != dtype:
        raise TypeError(f"v: expected dtype {dtype} (the dtype of k), got {np.dtype(v.dtype)}")
    slots = _integer_array("slot_mapping", slot_mapping, "[T]")
    if slots.shape != (t,):
        raise ValueError(f"slot_mapping: expected shape [T] = ({t},), got {slots.shape}")
    capacity = num_blocks * block_size
    if (slots >= capacity).any():
        raise ValueError(f"slot_mapping: expected slots < {capacity} (num_blocks x block_size) or "
                         f"negative (skipped), got {int(slots.max())}")
    written = slots[slots >= 0]
    if np.unique(written).size != written.size:
        values, counts = np.unique(written, return_counts=True)
        raise ValueError(f"slot_mapping: expected each slot at most once, got slot {int(values[counts > 1][0])} "
                         f"{int(counts.max())} times")
    scales = [positive_scale(n, s, hkv) for n, s in (("k_scale", k_scale), ("v_scale", v_scale))]
    if not _dtypes.is_fp8(kv_dtype):
        for name, s in zip(("k_scale", "v_scale"), scales):
            if (s != 1).any():
                raise ValueError(f"{name}: expected 1.0 for a {kv_dtype} cache (scales apply to fp8 "
                                 f"caches), got {s[s != 1][0]}")
    return k, v, np.ascontiguousarray(slots, dtype=np.int64), *scales


def _parts(x):
    """A list of the parts: the items of a sequence, or the slices of a stacked array along axis 0."""
    if hasattr(x, "shape"):
        if len(x.shape) == 0:
            raise ValueError("outs, lses: expected sequences of arrays or stacked arrays, got a scalar")
        return [x[i] for i in range(x.shape[0])]
    return list(x)


def merge_args(outs, lses):
    """Check :func:`fastattn.merge_attention_states` arguments; return (outs, lses, dtype).

    ``outs`` and ``lses`` are sequences of arrays (or stacked arrays with the
    parts on axis 0) of the same device.
    """
    outs = [as_array(f"outs[{i}]", o) for i, o in enumerate(_parts(outs))]
    lses = [as_array(f"lses[{i}]", x) for i, x in enumerate(_parts(lses))]
    if not outs:
        raise ValueError("outs: expected at least one partial output, got none")
    if len(lses) != len(outs):
        raise ValueError(f"lses: expected {len(outs)} arrays (one per output), got {len(lses)}")
    shape = tuple(outs[0].shape)
    if len(shape) < 1:
        raise ValueError("outs[0]: expected an array [..., D], got a scalar")
    dtype = float_dtype("outs[0]", outs[0])
    for i, (o, x) in enumerate(zip(outs, lses)):
        if tuple(o.shape) != shape:
            raise ValueError(f"outs[{i}]: expected the shape of outs[0] {shape}, got {tuple(o.shape)}")
        if np.dtype(o.dtype) != dtype:
            raise TypeError(f"outs[{i}]: expected dtype {dtype} (the dtype of outs[0]), got {np.dtype(o.dtype)}")
        if tuple(x.shape) != shape[:-1]:
            raise ValueError(f"lses[{i}]: expected shape {shape[:-1]} (outs without D), got {tuple(x.shape)}")
        if np.dtype(x.dtype) not in (np.float32, np.float64):
            raise TypeError(f"lses[{i}]: expected float32 or float64, got {np.dtype(x.dtype)}")
    return outs, lses, dtype


# --- projections ---------------------------------------------------------------------

def positive_int(name, value, minimum=1):
    """An int >= minimum (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _matching(name, x, shape, dtype, layout, like="x"):
    x = as_array(name, x)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {layout} = {tuple(shape)}, got {tuple(x.shape)}")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of {like}), got {np.dtype(x.dtype)}")
    return x


def qkv_projection_args(x, weight, bias, num_heads, num_kv_heads, head_dim):
    """Check :func:`fastattn.fused_qkv_projection` arguments; return (x, weight, bias, (Hq, Hkv, D))."""
    x = as_array("x", x)
    _shape("x", x, 3, "[B, S, H]")
    dtype = float_dtype("x", x)
    hq = positive_int("num_heads", num_heads)
    hkv = positive_int("num_kv_heads", num_kv_heads)
    d = positive_int("head_dim", head_dim)
    if hq % hkv:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={hq}, got {hkv}")
    n = (hq + 2 * hkv) * d
    weight = _matching("weight", weight, (n, x.shape[2]), dtype, "[(num_heads + 2*num_kv_heads)*head_dim, H]")
    if bias is not None:
        bias = _matching("bias", bias, (n,), dtype, "[(num_heads + 2*num_kv_heads)*head_dim]")
    return x, weight, bias, (hq, hkv, d)


def qkv_backward_args(dq, dk, dv, x, weight, has_bias):
    """Check :func:`fastattn.fused_qkv_projection_backward` arguments; return (dq, dk, dv, x, weight)."""
    dq, dk, dv, x = (as_array(n, a) for n, a in (("dq", dq), ("dk", dk), ("dv", dv), ("x", x)))
    b, s, h = _shape("x", x, 3, "[B, S, H]")
    dtype = float_dtype("x", x)
    _, hq, _, d = _shape("dq", dq, 4, "[B, Hq, S, D]")
    hkv = _shape("dk", dk, 4, "[B, Hkv, S, D]")[1]
    dq = _matching("dq", dq, (b, hq, s, d), dtype, "[B, Hq, S, D]")
    dk = _matching("dk", dk, (b, hkv, s, d), dtype, "[B, Hkv, S, D]")
    dv = _matching("dv", dv, (b, hkv, s, d), dtype, "[B, Hkv, S, D]")
    weight = _matching("weight", weight, ((hq + 2 * hkv) * d, h), dtype, "[(Hq + 2*Hkv)*D, H]")
    if not isinstance(has_bias, (bool, np.bool_)):
        raise TypeError(f"has_bias: expected a bool, got {type(has_bias).__name__}")
    return dq, dk, dv, x, weight


def output_projection_args(attn_out, weight, bias, residual):
    """Check :func:`fastattn.fused_output_projection_residual` arguments."""
    attn_out = as_array("attn_out", attn_out)
    b, s, p = _shape("attn_out", attn_out, 3, "[B, S, P]")
    dtype = float_dtype("attn_out", attn_out)
    weight = as_array("weight", weight)
    h = _shape("weight", weight, 2, "[H, P]")[0]
    weight = _matching("weight", weight, (h, p), dtype, "[H, P]", "attn_out")
    if bias is not None:
        bias = _matching("bias", bias, (h,), dtype, "[H]", "attn_out")
    if residual is not None:
        residual = _matching("residual", residual, (b, s, h), dtype, "[B, S, H]", "attn_out")
    return attn_out, weight, bias, residual


def output_backward_args(dy, attn_out, weight, has_bias):
    """Check :func:`fastattn.fused_output_projection_residual_backward` arguments."""
    dy, attn_out = as_array("dy", dy), as_array("attn_out", attn_out)
    b, s, p = _shape("attn_out", attn_out, 3, "[B, S, P]")
    dtype = float_dtype("attn_out", attn_out)
    weight = as_array("weight", weight)
    h = _shape("weight", weight, 2, "[H, P]")[0]
    weight = _matching("weight", weight, (h, p), dtype, "[H, P]", "attn_out")
    dy = _matching("dy", dy, (b, s, h), dtype, "[B, S, H]", "attn_out")
    if not isinstance(has_bias, (bool, np.bool_)):
        raise TypeError(f"has_bias: expected a bool, got {type(has_bias).__name__}")
    return dy, attn_out, weight


# --- grouped-query attention: repeat_kv and GQAConfig ---------------------------------

def _gqa_int(name, value, minimum, expected):
    """``value`` as an int (NumPy integers too, bools not), at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected {expected}, got {value}")
    return int(value)


def group_size_value(group_size):
    """``group_size`` as an int >= 1."""
    return _gqa_int("group_size", group_size, 1, "an int >= 1")


def _heads_array(name, x, heads):
    """A float [B, H, S, D] or [H, S, D] array; return it and its number of heads H."""
    x = as_array(name, x)
    shape = tuple(int(s) for s in x.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"{name}: expected a 4-d array [B, {heads}, S, D] or a 3-d array "
                         f"[{heads}, S, D], got shape {shape}")
    float_dtype(name, x)
    return x, shape[-3]


def repeat_kv_args(kv, group_size):
    """Check :func:`fastattn.repeat_kv` arguments; return (kv, group_size)."""
    kv = _heads_array("kv", kv, "Hkv")[0]
    return kv, group_size_value(group_size)


def repeat_kv_backward_args(dkv, group_size):
    """Check :func:`fastattn.repeat_kv_backward` arguments; return (dkv, group_size)."""
    dkv, heads = _heads_array("dkv", dkv, "Hq")
    group = group_size_value(group_size)
    if heads % group:
        raise ValueError(f"dkv: expected a number of heads Hq divisible by group_size={group}, "
                         f"got Hq={heads} (shape {tuple(dkv.shape)})")
    return dkv, group


def gqa_config_args(d_model, n_heads, n_kv_heads, causal, dropout):
    """Check the fields of :class:`fastattn.GQAConfig`; return them as int, int, int, bool, float."""
    d_model = _gqa_int("d_model", d_model, 1, "a positive int")
    n_heads = _gqa_int("n_heads", n_heads, 1, "a positive int")
    n_kv_heads = _gqa_int("n_kv_heads", n_kv_heads, 1, "a positive int")
    if d_model % n_heads:
        raise ValueError(f"d_model: expected a multiple of n_heads={n_heads}, got {d_model}")
    if n_kv_heads > n_heads:
        raise ValueError(f"n_kv_heads: expected at most n_heads={n_heads}, got {n_kv_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads: expected a divisor of n_heads={n_heads}, got {n_kv_heads}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, (int, float, np.integer, np.floating)):
        raise TypeError(f"dropout: expected a float in [0, 1), got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:  # NaN fails too
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout}")
    return d_model, n_heads, n_kv_heads, bool(causal), float(dropout)


def kv_cache_args(batch, seq_len, dtype=np.float16):
    """Check KV-cache planning arguments; return (batch, seq_len, itemsize in bytes)."""
    batch = _gqa_int("batch", batch, 0, "an int >= 0")
    seq_len = _gqa_int("seq_len", seq_len, 0, "an int >= 0")
    try:
        if dtype is None:
            raise TypeError
        dtype = _dtypes.as_dtype(dtype)
        itemsize, kind = dtype.itemsize, dtype.kind
    except TypeError:
        raise TypeError(f"dtype: expected a NumPy or ml_dtypes numeric dtype, got {dtype!r}") from None
    if kind not in "biufcV" or itemsize == 0:
        raise TypeError(f"dtype: expected a NumPy or ml_dtypes numeric dtype, got {dtype}")
    return batch, seq_len, itemsize


# --- the attention layer -----------------------------------------------------------------

def layer_args(embed_dim, num_heads, num_kv_heads, dtype):
    """Check MultiheadAttention's constructor arguments; return (E, Hq, Hkv, dtype)."""
    e = positive_int("embed_dim", embed_dim)
    hq = positive_int("num_heads", num_heads)
    hkv = hq if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
    if e % hq:
        raise ValueError(f"num_heads: expected a divisor of embed_dim={e}, got {hq}")
    if hq % hkv:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={hq}, got {hkv}")
    try:
        dtype = _dtypes.as_dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype: expected a NumPy dtype, got {dtype!r}") from None
    if not _dtypes.is_float(dtype):
        raise TypeError(f"dtype: expected float32, float64, float16 or bfloat16, got {dtype}")
    return e, hq, hkv, dtype


def layer_input(name, x, embed_dim, dtype, batch=None):
    """A [B, S, E] input of the layer's dtype (and batch, when given)."""
    x = as_array(name, x)
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 3 or shape[2] != embed_dim or (batch is not None and shape[0] != batch):
        want = f"B={batch} and " if batch is not None else ""
        raise ValueError(f"{name}: expected a 3-d array [B, S, E] with {want}E={embed_dim}, got shape {shape}")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the layer's dtype), got {np.dtype(x.dtype)}")
    return x


def cu_seqlens(name, x, total, batch=None):
    """Check a packed batch's offsets: int [B + 1], 0 first, non-decreasing, ``total`` last; return them
    as a host int64 array."""
    host = _integer_array(name, x, "[B + 1]")
    if host.ndim != 1 or host.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-d array [B + 1], got shape {host.shape}")
    if batch is not None and host.shape[0] != batch + 1:
        raise ValueError(f"{name}: expected shape [B + 1] = ({batch + 1},) like cu_seqlens_q, got {host.shape}")
    host = host.astype(np.int64)
    if host[0] != 0:
        raise ValueError(f"{name}: expected 0 as the first offset, got {host[0]}")
    steps = np.diff(host)
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise ValueError(f"{name}: expected non-decreasing offsets, got {host[i]} then {host[i + 1]} at {i}")
    if host[-1] != total:
        raise ValueError(f"{name}: expected the last offset to be the number of packed rows {total}, "
                         f"got {host[-1]}")
    return host


def varlen_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale, window,
                softcap, alibi_slopes):
    """Check packed ``[total, H, D]`` inputs, their offsets and options; return (q, k, v, cu_q, cu_k, slopes, spec).

    ``spec`` describes the batch padded to its longest sequences (``seq_q``/``seq_k``
    are ``max_seqlen_*`` when given): the coordinates of a bias or mask.
    """
    q, k, v = as_array("q", q), as_array("k", k), as_array("v", v)
    total_q, hq, d = _shape("q", q, 3, "[total_q, Hq, D]")
    total_k, hkv, dk = _shape("k", k, 3, "[total_k, Hkv, D]")
    if dk != d:
        raise ValueError(f"k: expected shape [total_k, Hkv, D] with D={d} (the head dim of q), got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"k: expected a number of KV heads that divides Hq={hq}, got Hkv={hkv}")
    if d == 0:
        raise ValueError(f"q: expected head dimension D >= 1, got shape {(total_q, hq, d)}")
    dtype = float_dtype("q", q)
    same_dtype(dtype, k=k, v=v)
    cu_q = cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q)
    cu_k = cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, batch=cu_q.shape[0] - 1)
    lengths = []
    for name, cu, hint in (("max_seqlen_q", cu_q, max_seqlen_q), ("max_seqlen_k", cu_k, max_seqlen_k)):
        longest = int(np.diff(cu).max(initial=0))
        if hint is not None:
            if isinstance(hint, bool) or not isinstance(hint, (int, np.integer)):
                raise TypeError(f"{name}: expected an int or None, got {type(hint).__name__}")
            if hint < longest:
                raise ValueError(f"{name}: expected at least the longest sequence ({longest}), got {hint}")
        lengths.append(longest if hint is None else int(hint))
    batch = cu_q.shape[0] - 1
    slopes = alibi_values(alibi_slopes, batch, hq)
    spec = AttentionSpec(batch, hq, hkv, lengths[0], lengths[1], d, dtype, scale_value(scale, d),
                         *window_values(window, causal), softcap_value(softcap))
    return q, k, v, cu_q, cu_k, slopes, spec


# --- rotary embeddings ---------------------------------------------------------------

@dataclass(frozen=True)
class RotarySpec:
    """Resolved sizes of one rotary call: ``x [B, H, S, D]`` with the first ``2 * half`` features rotated."""

    batch: int
    heads: int
    seq: int
    head_dim: int
    half: int
    max_pos: int
    dtype: np.dtype
    interleaved: bool

    @property
    def codec(self):
        return _dtypes.codec_of(self.dtype)

    @property
    def accum_dtype(self):
        return _dtypes.accum_dtype(self.dtype)


def rotary_args(name, x, cos, sin, positions, interleaved):
    """Check :func:`fastattn.rotary` arguments (``name`` is that of ``x``); return (x, cos, sin, positions, spec).

    ``positions`` is checked against the table length on the host before any kernel runs.
    """
    x = as_array(name, x)
    b, h, s, d = _shape(name, x, 4, "[B, H, S, D]")
    dtype = float_dtype(name, x)
    plan = rotary_plan((cos, sin), positions, interleaved, b, s, d)
    spec = RotarySpec(b, h, s, d, int(plan.cos.shape[1]), int(plan.cos.shape[0]), dtype, plan.interleaved)
    return x, plan.cos, plan.sin, plan.positions, spec


@dataclass(frozen=True)
class RotaryPlan:
    """Checked rotary tables (on the caller's device), host positions ``[B or 1, S]`` int64, the layout."""

    cos: object
    sin: object
    positions: object
    interleaved: bool


def rotary_plan(rotary, positions, interleaved, batch, seq, head_dim):
    """Check a ``rotary=(cos, sin)`` option for rows ``[B, S]`` of head dim ``D``; return a :class:`RotaryPlan`.

    Default positions are ``0 .. S-1``; positions are checked against the tables on the host.
    """
    try:
        cos, sin = rotary
    except (TypeError, ValueError):
        raise TypeError(f"rotary: expected a pair (cos, sin) of tables, got {type(rotary).__name__}") from None
    cos, sin = as_array("cos", cos), as_array("sin", sin)
    if len(cos.shape) != 2:
        raise ValueError(f"cos: expected a 2-d table [max_pos, rotary_dim / 2], got shape {tuple(cos.shape)}")
    if tuple(sin.shape) != tuple(cos.shape):
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    max_pos, half = (int(n) for n in cos.shape)
    for tname, t in (("cos", cos), ("sin", sin)):
        if np.dtype(t.dtype) not in (np.float32, np.float64):
            raise TypeError(f"{tname}: expected float32 or float64, got {np.dtype(t.dtype)}")
    if half == 0 or 2 * half > head_dim:
        raise ValueError(f"cos: expected 1 <= rotary_dim / 2 <= D / 2 = {head_dim // 2} columns, got {half}")
    if not isinstance(interleaved, (bool, np.bool_)):
        raise TypeError(f"interleaved: expected a bool, got {type(interleaved).__name__}")
    if positions is not None:
        host = _integer_array("positions", positions, "[B, S] or [S]")
        if host.shape not in ((seq,), (batch, seq)):
            raise ValueError(f"positions: expected shape [S] = ({seq},) or [B, S] = ({batch}, {seq}), "
                             f"got {host.shape}")
        if host.size and (host.min() < 0 or host.max() >= max_pos):
            bad = host[(host < 0) | (host >= max_pos)][0]
            raise ValueError(f"positions: expected values in [0, {max_pos}) (the rows of cos), got {bad}")
        positions = host.astype(np.int64).reshape(-1, seq)
    else:
        if seq > max_pos:
            raise ValueError(f"cos: expected at least S = {seq} rows for the default positions 0..S-1, "
                             f"got {max_pos}")
        positions = np.arange(seq, dtype=np.int64)[None]
    return RotaryPlan(cos, sin, positions, bool(interleaved))


def dropout_values(dropout_p, seed, forward, name="dropout_p"):
    """Check ``dropout_p`` (0 <= p < 1) and ``seed``; return ``(seed, p)`` or None without dropout.

    In a forward, ``seed=None`` draws one from NumPy's default generator; a
    backward with dropout needs the forward's seed.
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1) (1 would drop every key), got {dropout_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= int(seed) < 2 ** 64):
        raise ValueError(f"seed: expected None or an int in [0, 2**64), got {seed!r}")
    if p == 0.0:
        return None
    if seed is None:
        if not forward:
            raise ValueError("seed: expected the seed of the forward (attention(..., return_seed=True)) "
                             "to replay its dropout, got None")
        seed = int(np.random.default_rng().integers(0, 2 ** 63))
    return int(seed), p
