"""Fused projections: the QKV projection into head layout and the output projection with its residual.

Each function validates its arguments, picks the CPU or CUDA backend from the
arrays' device and calls the kernel; see ``docs/layer.md``.
"""
from . import _dispatch, _validate


def fused_qkv_projection(x, weight, bias=None, *, num_heads, num_kv_heads, head_dim, rotary=None, positions=None,
                         interleaved=False):
    """Project ``x`` to queries, keys and values in head layout with one GEMM.

    ``x @ weight.T + bias`` is computed tile by tile and each tile's columns go
    straight to their head: no ``[B, S, (Hq + 2 Hkv) D]`` intermediate and no
    transposition pass.

    Parameters
    ----------
    x : array, shape [B, S, H]
        float32, float64, float16 or bfloat16 (half formats accumulate in float32).
    weight : array, shape [(num_heads + 2*num_kv_heads) * head_dim, H]
        Rows ``[0, Hq*D)`` make q (head ``h`` is rows ``h*D .. h*D+D``), the next
        ``Hkv*D`` make k, the last ``Hkv*D`` make v.  Dtype of ``x``.
    bias : array, shape [(num_heads + 2*num_kv_heads) * head_dim], optional
    num_heads, num_kv_heads, head_dim : int
        ``num_kv_heads`` divides ``num_heads`` (grouped-query attention).
    rotary : (cos, sin), optional
        Rotary tables (:func:`fastattn.rotary_tables`, on the device of ``x``):
        q and k come out rotated as :func:`fastattn.rotary` would turn them, the
        rotation done in the projection's epilogue while each row is in cache
        (on the CPU; on CUDA a rotary kernel follows the GEMM).
    positions : int array, shape [B, S] or [S], optional
        The tokens' positions for ``rotary`` (default ``0 .. S-1``).
    interleaved : bool
        GPT-J's pairing for ``rotary`` (default: GPT-NeoX halves).

    Returns
    -------
    q : array, shape [B, num_heads, S, head_dim]
    k, v : arrays, shape [B, num_kv_heads, S, head_dim]
        In the dtype of ``x``, on its device; ready for :func:`fastattn.attention`.

    Raises
    ------
    ValueError, TypeError
        Shapes, dtypes, head counts (the message names the argument).

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 5, 32), dtype=np.float32)
    >>> w = rng.standard_normal(((4 + 2 * 2) * 8, 32), dtype=np.float32)
    >>> q, k, v = fastattn.fused_qkv_projection(x, w, num_heads=4, num_kv_heads=2, head_dim=8)
    >>> q.shape, k.shape
    ((2, 4, 5, 8), (2, 2, 5, 8))
    >>> y = x @ w.T  # the unfused path: one matmul, then split and transpose
    >>> bool(np.allclose(k, y[..., 32:48].reshape(2, 5, 2, 8).transpose(0, 2, 1, 3), atol=1e-4))
    True
    """
    x, weight, bias, (hq, hkv, d) = _validate.qkv_projection_args(x, weight, bias, num_heads, num_kv_heads,
                                                                 head_dim)
    plan = _rotary_plan(rotary, positions, interleaved, x, d)
    backend = _dispatch.backend_of(x=x, weight=weight, bias=bias, **_tables(plan))
    return tuple(backend.projection.project_heads(x, weight, bias, (hq, hkv, hkv), d, rotary=plan,
                                                  rotated=(True, True, False)))


def _rotary_plan(rotary, positions, interleaved, x, head_dim):
    """The checked rotary option of a projection of ``x [B, S, H]`` (None without one)."""
    if rotary is None:
        if positions is not None:
            raise ValueError("positions: expected rotary=(cos, sin) to go with them, got rotary=None")
        return None
    return _validate.rotary_plan(rotary, positions, interleaved, int(x.shape[0]), int(x.shape[1]), head_dim)


def _tables(plan):
    return {} if plan is None else {"cos": plan.cos, "sin": plan.sin}


def fused_qkv_projection_backward(dq, dk, dv, x, weight, *, has_bias=False, rotary=None, positions=None,
                                  interleaved=False):
    """Gradients of :func:`fused_qkv_projection` with respect to x, weight and bias.

    The head-layout gradients are read in place, tile by tile (no concatenated copy).

    Parameters
    ----------
    dq : array, shape [B, Hq, S, D]
    dk, dv : arrays, shape [B, Hkv, S, D]
        Gradients of the loss with respect to q, k and v; dtype of ``x``.
    x, weight : arrays
        The forward inputs.
    has_bias : bool
        Whether the forward had a bias (then its gradient is returned).
    rotary, positions, interleaved
        As given to the forward: ``dq`` and ``dk`` are turned back first.

    Returns
    -------
    dx : array, shape [B, S, H]
    dweight : array, shape [(Hq + 2*Hkv)*D, H]
    dbias : array, shape [(Hq + 2*Hkv)*D], or None without a bias
        In the dtype of ``x``.  On the CPU each gradient is one BLAS GEMM
        (the same bits every run at a given BLAS thread count).

    Raises
    ------
    ValueError, TypeError
        Shapes or dtypes that do not match.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 3, 16), dtype=np.float32)
    >>> w = rng.standard_normal((3 * 2 * 4, 16), dtype=np.float32)
    >>> q, k, v = fastattn.fused_qkv_projection(x, w, num_heads=2, num_kv_heads=2, head_dim=4)
    >>> dx, dw, db = fastattn.fused_qkv_projection_backward(
    ...     np.ones_like(q), np.zeros_like(k), np.zeros_like(v), x, w, has_bias=True)
    >>> bool(np.allclose(dx, np.ones((1, 3, 8)) @ w[:8], atol=1e-5)), db[:8].tolist()
    (True, [3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    """
    dq, dk, dv, x, weight = _validate.qkv_backward_args(dq, dk, dv, x, weight, has_bias)
    plan = _rotary_plan(rotary, positions, interleaved, x, int(dq.shape[3]))
    backend = _dispatch.backend_of(dq=dq, dk=dk, dv=dv, x=x, weight=weight, **_tables(plan))
    return backend.projection.qkv_backward((dq, dk, dv), x, weight, bool(has_bias), rotary=plan,
                                           rotated=(True, True, False))


def fused_output_projection_residual(attn_out, weight, bias, residual):
    """``attn_out @ weight.T + bias + residual`` in one pass (bias and residual in the GEMM epilogue).

    Parameters
    ----------
    attn_out : array, shape [B, S, P]
        float32, float64, float16 or bfloat16.
    weight : array, shape [H, P]
    bias : array, shape [H], or None
    residual : array, shape [B, S, H], or None
        All in the dtype of ``attn_out``.

    Returns
    -------
    y : array, shape [B, S, H]
        In the dtype of ``attn_out`` (half formats accumulate in float32 and round once).

    Raises
    ------
    ValueError, TypeError
        Shapes or dtypes that do not match.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> a = rng.standard_normal((2, 3, 8), dtype=np.float32)
    >>> w = rng.standard_normal((4, 8), dtype=np.float32)
    >>> b, r = np.ones(4, np.float32), np.full((2, 3, 4), 2.0, np.float32)
    >>> y = fastattn.fused_output_projection_residual(a, w, b, r)
    >>> bool(np.allclose(y, a @ w.T + b + r, atol=1e-5))
    True
    """
    attn_out, weight, bias, residual = _validate.output_projection_args(attn_out, weight, bias, residual)
    backend = _dispatch.backend_of(attn_out=attn_out, weight=weight, bias=bias, residual=residual)
    return backend.projection.output_projection(attn_out, weight, bias, residual)


def fused_output_projection_residual_backward(dy, attn_out, weight, *, has_bias=False):
    """Gradients of :func:`fused_output_projection_residual`.

    Parameters
    ----------
    dy : array, shape [B, S, H]
        Gradient of the loss with respect to ``y``.
    attn_out, weight : arrays
        The forward inputs.
    has_bias : bool
        Whether the forward had a bias.

    Returns
    -------
    dattn_out : array, shape [B, S, P]
    dweight : array, shape [H, P]
    dbias : array, shape [H], or None without a bias
    dresidual : array, shape [B, S, H]
        A copy of ``dy`` (the residual passes the gradient through).

    Raises
    ------
    ValueError, TypeError
        Shapes or dtypes that do not match.

    Examples
    --------
    >>> import numpy as np, fastattn
    >>> rng = np.random.default_rng(0)
    >>> a, w = rng.standard_normal((1, 2, 3)), rng.standard_normal((4, 3))
    >>> dy = np.ones((1, 2, 4))
    >>> da, dw, db, dr = fastattn.fused_output_projection_residual_backward(dy, a, w, has_bias=True)
    >>> bool(np.allclose(dw, dy[0].T @ a[0])), db.tolist()
    (True, [2.0, 2.0, 2.0, 2.0])
    """
    dy, attn_out, weight = _validate.output_backward_args(dy, attn_out, weight, has_bias)
    backend = _dispatch.backend_of(dy=dy, attn_out=attn_out, weight=weight)
    return backend.projection.output_backward(dy, attn_out, weight, bool(has_bias))
