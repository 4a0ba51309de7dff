"""Grouped-query attention: :func:`repeat_kv`, its backward, and :class:`GQAConfig`.

The attention kernels are natively GQA (query head ``h`` reads KV head
``h // group_size``) and never repeat K/V.  :func:`repeat_kv` materialises the
repeated heads for code that needs them as an array; :class:`GQAConfig`
describes a layer's head layout and plans its parameter and KV-cache sizes.
See ``docs/gqa.md``.
"""
from dataclasses import KW_ONLY, dataclass

import numpy as np

from . import _dispatch, _validate


def repeat_kv(kv, group_size):
    """Repeat each KV head ``group_size`` times along the head axis.

    Output head ``h`` is input head ``h // group_size`` (the convention of
    ``repeat_kv`` in Hugging Face transformers and of ``torch.repeat_interleave``
    on dim 1), which is also how the attention kernels map query heads to KV heads.

    Parameters
    ----------
    kv : array, shape [B, Hkv, S, D] or [Hkv, S, D]
        Keys or values: float32, float64, float16 or ``ml_dtypes.bfloat16``; a
        NumPy array (CPU kernel) or a CUDA device array (CUDA kernel).  Any strides.
    group_size : int
        Query heads per KV head, ``Hq // Hkv``; at least 1.

    Returns
    -------
    array, shape [B, Hkv * group_size, S, D] or [Hkv * group_size, S, D]
        A new array (also for ``group_size=1``) in the dtype of ``kv``, on its device.
        The values are copied bit for bit.

    Raises
    ------
    ValueError
        ``kv`` not 3-d or 4-d, or ``group_size < 1`` (the message names the argument).
    TypeError
        ``kv`` not of a float dtype, or ``group_size`` not an int.

    See Also
    --------
    repeat_kv_backward : its adjoint, which sums each group of heads.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> kv = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)  # 2 KV heads
    >>> out = fastattn.repeat_kv(kv, 3)
    >>> out.shape
    (1, 6, 3, 4)
    >>> bool((out[0, 2] == kv[0, 0]).all() and (out[0, 3] == kv[0, 1]).all())
    True
    >>> bool((out == np.repeat(kv, 3, axis=1)).all())
    True
    """
    kv, group_size = _validate.repeat_kv_args(kv, group_size)
    backend = _dispatch.backend_of(kv=kv)
    return backend.gqa.repeat_kv(kv, group_size)


def repeat_kv_backward(dkv, group_size):
    """Gradient of :func:`repeat_kv`: sum each group of ``group_size`` consecutive heads.

    Parameters
    ----------
    dkv : array, shape [B, Hq, S, D] or [Hq, S, D]
        Gradient with respect to the repeated heads; float32, float64, float16
        or ``ml_dtypes.bfloat16``, on the CPU or a CUDA device.  ``Hq`` must be
        a multiple of ``group_size``.
    group_size : int
        The ``group_size`` given to :func:`repeat_kv`; at least 1.

    Returns
    -------
    array, shape [B, Hq // group_size, S, D] or [Hq // group_size, S, D]
        A new array in the dtype of ``dkv``, on its device: head ``k`` is the sum
        of heads ``k * group_size`` to ``(k + 1) * group_size - 1``.

    Raises
    ------
    ValueError
        ``dkv`` not 3-d or 4-d, ``group_size < 1``, or ``Hq`` not divisible by it.
    TypeError
        ``dkv`` not of a float dtype, or ``group_size`` not an int.

    Notes
    -----
    The sum runs in float32 (float64 for float64 inputs) in a fixed order and is
    rounded once into the input dtype, so results are the same bits on every run.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> dkv = np.ones((1, 8, 5, 16), dtype=np.float32)       # 8 query heads
    >>> dk = fastattn.repeat_kv_backward(dkv, 4)             # 2 KV heads, 4 terms each
    >>> dk.shape, float(dk.max())
    ((1, 2, 5, 16), 4.0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 16))   # [Hkv, S, D] works too
    >>> y = np.random.default_rng(1).standard_normal((8, 5, 16))
    >>> bool(np.isclose(np.vdot(fastattn.repeat_kv(x, 4), y), np.vdot(x, fastattn.repeat_kv_backward(y, 4))))
    True
    """
    dkv, group_size = _validate.repeat_kv_backward_args(dkv, group_size)
    backend = _dispatch.backend_of(dkv=dkv)
    return backend.gqa.repeat_kv_backward(dkv, group_size)


#: (d_model, n_heads, n_kv_heads) of well-known models' attention layers.
_PRESETS = {
    "llama2-7b": (4096, 32, 32),
    "llama2-70b": (8192, 64, 8),
    "mistral-7b": (4096, 32, 8),
    "falcon-40b": (8192, 128, 1),
}


def _bytes_text(n):
    """A byte count in binary units: 512 B, 4 KiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def _plural(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@dataclass(frozen=True)
class GQAConfig:
    """Head layout of a grouped-query attention layer, and its size arithmetic.

    ``n_heads`` query heads share ``n_kv_heads`` key/value heads in groups of
    ``group_size = n_heads // n_kv_heads``.  ``n_kv_heads == n_heads`` is
    multi-head attention (MHA), ``n_kv_heads == 1`` multi-query attention (MQA).

    Parameters
    ----------
    d_model : int
        Model (embedding) width; a multiple of ``n_heads``.
    n_heads : int
        Query heads.
    n_kv_heads : int
        Key/value heads; a divisor of ``n_heads``.
    causal : bool
        Whether the layer is causal (decoder self-attention).
    dropout : float
        Attention dropout probability, in ``[0, 1)``.

    Raises
    ------
    ValueError
        Sizes below 1, ``d_model`` not a multiple of ``n_heads``, ``n_kv_heads``
        above ``n_heads`` or not a divisor of it, or ``dropout`` outside
        ``[0, 1)``; the message names the field.
    TypeError
        A size that is not an int, ``causal`` not a bool, ``dropout`` not a number.

    Examples
    --------
    >>> import numpy as np
    >>> from fastattn import GQAConfig
    >>> cfg = GQAConfig.preset("mistral-7b")
    >>> cfg
    GQAConfig(d_model=4096, n_heads=32, n_kv_heads=8, causal=False, dropout=0.0)
    >>> cfg.head_dim, cfg.group_size, cfg.kv_cache_reduction
    (128, 4, 4.0)
    >>> cfg.kv_cache_bytes(batch=1, seq_len=4096) // 2**20   # MiB per layer in float16
    16
    >>> cfg.memory_savings(batch=1, seq_len=4096)
    0.75
    >>> GQAConfig(4096, 32, 5)
    Traceback (most recent call last):
    ...
    ValueError: n_kv_heads: expected a divisor of n_heads=32, got 5
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    _: KW_ONLY
    causal: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        values = _validate.gqa_config_args(self.d_model, self.n_heads, self.n_kv_heads,
                                           self.causal, self.dropout)
        for name, value in zip(("d_model", "n_heads", "n_kv_heads", "causal", "dropout"), values):
            object.__setattr__(self, name, value)

    # --- constructors -----------------------------------------------------------------

    @classmethod
    def mha(cls, d_model, n_heads, **kw):
        """Multi-head attention: one KV head per query head (``n_kv_heads = n_heads``).

        >>> GQAConfig.mha(512, 8).is_mha
        True
        """
        return cls(d_model, n_heads, n_heads, **kw)

    @classmethod
    def mqa(cls, d_model, n_heads, **kw):
        """Multi-query attention: one KV head shared by all query heads (``n_kv_heads = 1``).

        >>> GQAConfig.mqa(512, 8).kv_cache_reduction
        8.0
        """
        return cls(d_model, n_heads, 1, **kw)

    @classmethod
    def preset(cls, name, **kw):
        """The attention layout of a well-known model; ``kw`` sets ``causal`` and ``dropout``.

        Names: see :meth:`presets`.  An unknown name raises ``ValueError``
        listing the known ones.

        >>> GQAConfig.preset("llama2-70b", causal=True)
        GQAConfig(d_model=8192, n_heads=64, n_kv_heads=8, causal=True, dropout=0.0)
        """
        if not isinstance(name, str):
            raise TypeError(f"name: expected a preset name (str), got {type(name).__name__}")
        if name not in _PRESETS:
            known = ", ".join(repr(n) for n in _PRESETS)
            raise ValueError(f"name: expected one of {known}, got {name!r}")
        return cls(*_PRESETS[name], **kw)

    @classmethod
    def presets(cls):
        """Names accepted by :meth:`preset`.

        >>> GQAConfig.presets()
        ('llama2-7b', 'llama2-70b', 'mistral-7b', 'falcon-40b')
        """
        return tuple(_PRESETS)

    # --- derived sizes ----------------------------------------------------------------

    @property
    def head_dim(self):
        """Width of one head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def group_size(self):
        """Query heads per KV head, ``n_heads // n_kv_heads``."""
        return self.n_heads // self.n_kv_heads

    @property
    def kv_cache_reduction(self):
        """How many times smaller the KV cache is than MHA's: ``n_heads / n_kv_heads``."""
        return self.n_heads / self.n_kv_heads

    @property
    def is_mha(self):
        """True when every query head has its own KV head."""
        return self.n_kv_heads == self.n_heads

    @property
    def is_mqa(self):
        """True when all query heads share one KV head."""
        return self.n_kv_heads == 1

    @property
    def _kind(self):
        if self.is_mha:
            return "Multi-Head Attention (MHA)"
        if self.is_mqa:
            return "Multi-Query Attention (MQA)"
        return "Grouped-Query Attention (GQA)"

    def num_parameters(self):
        """Weights of the q, k, v and output projections (no biases).

        q and out are ``d_model x d_model`` each; k and v are
        ``d_model x (n_kv_heads * head_dim)`` each.
        """
        kv_width = self.n_kv_heads * self.head_dim
        return 2 * self.d_model * self.d_model + 2 * self.d_model * kv_width

    def kv_cache_bytes(self, batch, seq_len, dtype=np.float16):
        """Bytes of this layer's K and V caches: ``2 * batch * n_kv_heads * seq_len * head_dim * itemsize``.

        ``dtype`` is any NumPy or ml_dtypes dtype (float16 by default;
        ``ml_dtypes.float8_e4m3fn`` for an fp8 cache).
        """
        batch, seq_len, itemsize = _validate.kv_cache_args(batch, seq_len, dtype)
        return 2 * batch * self.n_kv_heads * seq_len * self.head_dim * itemsize

    def memory_savings(self, batch, seq_len):
        """Fraction of the MHA KV cache saved: ``1 - kv_cache_bytes / (MHA kv_cache_bytes)``.

        The same for every ``batch``, ``seq_len`` and dtype: ``1 - n_kv_heads / n_heads``.
        """
        _validate.kv_cache_args(batch, seq_len)
        return 1.0 - self.n_kv_heads / self.n_heads

    def summary(self):
        """A multi-line description: the kind of attention, the sizes and the cache per token."""
        per_token = self.kv_cache_bytes(1, 1)
        if self.is_mha:
            versus = "the same (this is MHA)"
        else:
            versus = (f"{self.kv_cache_reduction:g}x smaller, {self.memory_savings(1, 1):.1%} saved "
                      f"(MHA: {_bytes_text(per_token * self.group_size)} per token)")
        if self.is_mha:
            heads = f"{_plural(self.n_heads, 'head')}, each with its own K and V"
        else:
            heads = (f"{_plural(self.n_heads, 'query head')} sharing {_plural(self.n_kv_heads, 'KV head')}, "
                     f"group size {self.group_size}")
        lines = [
            f"{self._kind}: {heads}",
            f"  d_model             {self.d_model}",
            f"  head_dim            {self.head_dim}",
            f"  causal              {self.causal}",
            f"  dropout             {self.dropout}",
            f"  parameters          {self.num_parameters():,} (q, k, v and output projections, no biases)",
            f"  KV cache per token  {_bytes_text(per_token)} in float16 (K and V, this layer)",
            f"  KV cache vs MHA     {versus}",
        ]
        return "\n".join(lines)

    def attention_layer(self, seed=None, **kwargs):
        """A :class:`fastattn.layers.MultiheadAttention` with this head layout.

        ``kwargs`` (``bias``, ``dtype``, ...) go to the layer, and ``dropout`` is
        this config's (applied in ``train()`` mode; the layer starts in ``eval()``).
        ``causal`` is an argument of the layer's ``forward``.
        """
        from .layers import MultiheadAttention

        kwargs.setdefault("dropout", self.dropout)
        return MultiheadAttention(self.d_model, self.n_heads, self.n_kv_heads, seed=seed, **kwargs)
