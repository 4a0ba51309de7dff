"""Rotary position embeddings (RoPE): the tables, the rotation and its backward.

The rotation of position ``p`` turns each pair of features by the angle
``p * inv_freq[i]``; :func:`rotary_tables` builds ``cos``/``sin`` tables of
those angles (with the scalings long-context checkpoints use) and
:func:`rotary` applies them to ``[B, H, S, D]`` arrays on the CPU or the GPU.
See ``docs/rotary.md``.
"""
import math

import numpy as np

from . import _dispatch, _validate

#: Scalings :func:`rotary_tables` knows, as the ``"type"`` of its ``scaling`` dict.
SCALINGS = ("linear", "ntk", "yarn", "llama3")


def rotary(x, cos, sin, *, positions=None, interleaved=False):
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` features of every row of ``x`` by its position.

    With ``c = cos[p]`` and ``s = sin[p]`` for the row at position ``p``, each pair
    ``(a, b)`` of rotated features becomes ``(a c - b s, b c + a s)``.  The pairs are
    ``(i, i + rotary_dim / 2)`` in the GPT-NeoX ("half") layout, the default used by
    LLaMA, Mistral and Qwen checkpoints, or ``(2 i, 2 i + 1)`` with
    ``interleaved=True`` (GPT-J); features past ``rotary_dim`` are copied.

    Parameters
    ----------
    x : array, shape [B, H, S, D]
        Queries or keys: float32, float64, float16 or bfloat16, a NumPy array or a
        CUDA device array.
    cos, sin : arrays, shape [max_pos, rotary_dim / 2]
        float32 or float64 tables (:func:`rotary_tables`), on the device of ``x``.
    positions : int array, shape [B, S] or [S], optional
        The position of each row (any order, gaps allowed); defaults to
        ``0 .. S-1``.  Checked to lie in ``[0, max_pos)`` before any kernel runs.
    interleaved : bool
        GPT-J's pairing of neighbouring features instead of the two halves.

    Returns
    -------
    array, shape [B, H, S, D]
        In the dtype of ``x``, on its device; computed in float32 (float64 for
        float64 ``x``) and rounded once.

    Raises
    ------
    ValueError
        Shapes that do not fit, ``rotary_dim > D``, positions out of the table.
    TypeError
        Non-float ``x`` or tables, non-integer positions, mixed devices.

    See Also
    --------
    rotary_backward : the gradient (the rotation by the opposite angle).
    rotary_tables : the tables.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> cos, sin = fastattn.rotary_tables(64, max_pos=128)
    >>> q = np.random.default_rng(0).standard_normal((1, 2, 5, 64), dtype=np.float32)
    >>> rq = fastattn.rotary(q, cos, sin)
    >>> bool(np.allclose(rq, fastattn.reference.rotary(q, cos, sin), atol=1e-5))
    True
    >>> bool(np.allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5))  # a rotation
    True
    """
    x, cos, sin, positions, spec = _validate.rotary_args("x", x, cos, sin, positions, interleaved)
    backend = _dispatch.backend_of(x=x, cos=cos, sin=sin)
    return backend.rotary.rotate(x, cos, sin, positions, spec, 1)


def rotary_backward(dy, cos, sin, *, positions=None, interleaved=False):
    """Gradient of :func:`rotary` with respect to ``x``: ``dy`` rotated by the opposite angles.

    Parameters
    ----------
    dy : array, shape [B, H, S, D]
        Gradient of the loss with respect to the rotated array.
    cos, sin, positions, interleaved
        As given to :func:`rotary`.

    Returns
    -------
    array, shape [B, H, S, D]
        ``dx`` in the dtype of ``dy``, on its device.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> cos, sin = fastattn.rotary_tables(8, max_pos=16)
    >>> x = np.random.default_rng(1).standard_normal((1, 1, 4, 8))
    >>> back = fastattn.rotary_backward(fastattn.rotary(x, cos, sin), cos, sin)   # a rotation's inverse
    >>> bool(np.allclose(back, x))
    True
    """
    dy, cos, sin, positions, spec = _validate.rotary_args("dy", dy, cos, sin, positions, interleaved)
    backend = _dispatch.backend_of(dy=dy, cos=cos, sin=sin)
    return backend.rotary.rotate(dy, cos, sin, positions, spec, -1)


def _inv_freq(rotary_dim, base, scaling):
    """The rotation frequency of each pair, ``[rotary_dim / 2]`` float64, with ``scaling`` applied, and the
    factor that multiplies cos and sin (YaRN's attention scale; 1 otherwise)."""
    inv_freq = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling is None:
        return inv_freq, 1.0
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    if kind == "linear":  # position interpolation: positions divided by factor
        return inv_freq / factor, 1.0
    if kind == "ntk":  # NTK-aware: a larger base (the static form of Hugging Face's "dynamic")
        base = base * factor ** (rotary_dim / (rotary_dim - 2)) if rotary_dim > 2 else base
        return 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim), 1.0
    original = float(scaling["original_max_position"])
    if kind == "llama3":
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    # YaRN (Peng et al. 2023), as Hugging Face's _compute_yarn_parameters
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))

    def correction_dim(rotations):
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
    ramp = np.clip((np.arange(rotary_dim // 2) - low) / max(high - low, 0.001), 0.0, 1.0)
    extrapolate = 1.0 - ramp
    scale = float(scaling.get("attention_factor", 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0))
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, scale


def rotary_tables(rotary_dim, max_pos, base=10000.0, scaling=None, dtype=np.float32):
    """``(cos, sin)`` tables ``[max_pos, rotary_dim / 2]`` for :func:`rotary`.

    Row ``p`` holds ``cos(p * inv_freq)`` and ``sin(p * inv_freq)`` with
    ``inv_freq[i] = base ** (-2 i / rotary_dim)``, computed in float64 and
    rounded once to ``dtype``.

    Parameters
    ----------
    rotary_dim : int
        Features rotated (even, at least 2); the head dimension for full rotary.
    max_pos : int
        Rows of the tables: positions ``0 .. max_pos - 1``.
    base : float
        The frequency base (10000 in most checkpoints; 500000 in LLaMA 3, 1e6 in Qwen 2).
    scaling : dict, optional
        Long-context scaling, as Hugging Face's ``rope_scaling``:

        - ``{"type": "linear", "factor": f}``: position interpolation, angles divided by ``f``;
        - ``{"type": "ntk", "factor": f}``: NTK-aware scaling, ``base * f ** (d / (d - 2))``
          (the static form of Hugging Face's ``"dynamic"``);
        - ``{"type": "yarn", "factor": f, "original_max_position": n}`` (optional
          ``beta_fast=32``, ``beta_slow=1``, ``attention_factor``): YaRN's ramp between
          interpolated and original frequencies, cos and sin times ``0.1 ln f + 1``;
        - ``{"type": "llama3", "factor": f, "original_max_position": n}`` (optional
          ``low_freq_factor=1``, ``high_freq_factor=4``): LLaMA 3.1's smoothed interpolation.
    dtype : float32 or float64

    Returns
    -------
    cos, sin : NumPy arrays, shape [max_pos, rotary_dim / 2]

    Raises
    ------
    ValueError
        An odd or non-positive ``rotary_dim``, a negative ``max_pos``, a
        non-positive ``base``, an unknown scaling or a missing field.

    Examples
    --------
    >>> import fastattn
    >>> cos, sin = fastattn.rotary_tables(128, 4096, base=500000.0,
    ...                                   scaling={"type": "llama3", "factor": 8.0, "original_max_position": 8192})
    >>> cos.shape, float(cos[0, 0]), float(sin[0, 0])
    ((4096, 64), 1.0, 0.0)
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)) or rotary_dim < 2 \
            or rotary_dim % 2:
        raise ValueError(f"rotary_dim: expected an even int >= 2, got {rotary_dim!r}")
    if isinstance(max_pos, bool) or not isinstance(max_pos, (int, np.integer)) or max_pos < 0:
        raise ValueError(f"max_pos: expected an int >= 0, got {max_pos!r}")
    if not isinstance(base, (int, float, np.integer, np.floating)) or not base > 0:
        raise ValueError(f"base: expected a positive float, got {base!r}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {np.dtype(dtype)}")
    if scaling is not None:
        if not isinstance(scaling, dict) or scaling.get("type") not in SCALINGS:
            raise ValueError(f"scaling: expected None or a dict with 'type' in {SCALINGS}, got {scaling!r}")
        if scaling["type"] in ("yarn", "llama3") and "original_max_position" not in scaling:
            raise ValueError(f"scaling: expected 'original_max_position' for type {scaling['type']!r}")
    inv_freq, scale = _inv_freq(int(rotary_dim), float(base), scaling)
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
    return (np.cos(angles) * scale).astype(dtype), (np.sin(angles) * scale).astype(dtype)
