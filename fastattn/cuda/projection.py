"""CUDA kernels of the projection family: one shared-memory tiled GEMM with pluggable loads and epilogues.

The twin of :mod:`fastattn.cpu.projection`.  The GEMM is numba-cuda's
``fast_matmul`` idiom, register-blocked: a ``T x T`` block of threads stages
``2T x T`` tiles of A and ``T x 2T`` tiles of B in shared memory and each
thread keeps a ``2 x 2`` patch of C in registers.  What differs between the
six products of the family is only how an element of A or B is read (plain
rows, head layout, the three q/k/v gradients side by side, transposed) and
where a result goes (scattered into q/k/v heads with the bias, added to a bias
and a residual, a plain float32 matrix for weight gradients): those are small
device functions, and each combination is compiled once.

The host functions take the CPU twin's ``pool`` argument and ignore it: the
GPU runs every kernel on one device, so there is no thread pool to choose.
"""
import numpy as np
from numba import cuda

from .._config import config
from . import _device, _launch
from .paged import _convert, _zeros

_kernels = {}


def _readers(load):
    """How each product reads an element of A[i, k] or B[k, j], for elements decoded by ``load``."""

    @_device.inline
    def rows(a0, a1, a2, i, k, seq, w0, w1):
        """A 2-D array [M, K]."""
        return load(a0[i, k])

    @_device.inline
    def heads(a0, a1, a2, i, k, seq, w0, w1):
        """Head layout [B, G, S, Dg] read as [B*S, G*Dg]."""
        dg = a0.shape[3]
        return load(a0[i // seq, k // dg, i % seq, k % dg])

    @_device.inline
    def heads_t(a0, a1, a2, i, k, seq, w0, w1):
        """The transpose of ``heads``: [G*Dg, B*S]."""
        return heads(a0, a1, a2, k, i, seq, w0, w1)

    @_device.inline
    def sections(a0, a1, a2, i, k, seq, w0, w1):
        """Three head-layout arrays side by side (q, k, v gradients): [B*S, w0 + w1 + w2]."""
        if k < w0:
            return heads(a0, a0, a0, i, k, seq, w0, w1)
        if k < w0 + w1:
            return heads(a1, a1, a1, i, k - w0, seq, w0, w1)
        return heads(a2, a2, a2, i, k - w0 - w1, seq, w0, w1)

    @_device.inline
    def sections_t(a0, a1, a2, i, k, seq, w0, w1):
        return sections(a0, a1, a2, k, i, seq, w0, w1)

    @_device.inline
    def weight(b0, k, j, seq):
        """B = W: a weight [K, N] as it is."""
        return load(b0[k, j])

    @_device.inline
    def weight_t(b0, k, j, seq):
        """B = W.T for a weight stored [N, K] (nn.Linear's layout)."""
        return load(b0[j, k])

    @_device.inline
    def heads_b(b0, k, j, seq):
        """B = a head-layout array [B, G, S, Dg] read as [B*S, G*Dg]."""
        dg = b0.shape[3]
        return load(b0[k // seq, j // dg, k % seq, j % dg])

    return ({"rows": rows, "heads": heads, "heads_t": heads_t, "sections": sections, "sections_t": sections_t},
            {"weight": weight, "weight_t": weight_t, "heads": heads_b}, sections)


def _writers(load, store):
    """Where each product writes C[i, j] (``value`` in the accumulation type)."""

    @_device.inline
    def to_qkv(c0, c1, c2, bias, res, i, j, value, seq, has_bias, has_res, w0, w1):
        """Add the bias and scatter column j to its head of q (c0), k (c1) or v (c2)."""
        if has_bias:
            value += load(bias[j])
        d = c0.shape[3]
        b, s = i // seq, i % seq
        if j < w0:
            c0[b, j // d, s, j % d] = store(value)
        elif j < w0 + w1:
            c1[b, (j - w0) // d, s, j % d] = store(value)
        else:
            c2[b, (j - w0 - w1) // d, s, j % d] = store(value)

    @_device.inline
    def to_output(c0, c1, c2, bias, res, i, j, value, seq, has_bias, has_res, w0, w1):
        """y [B, S, N] = value + bias + residual."""
        b, s = i // seq, i % seq
        if has_bias:
            value += load(bias[j])
        if has_res:
            value += load(res[b, s, j])
        c0[b, s, j] = store(value)

    @_device.inline
    def to_heads(c0, c1, c2, bias, res, i, j, value, seq, has_bias, has_res, w0, w1):
        """A head-layout result [B, G, S, Dg] (an input gradient)."""
        dg = c0.shape[3]
        c0[i // seq, j // dg, i % seq, j % dg] = store(value)

    @_device.inline
    def to_matrix(c0, c1, c2, bias, res, i, j, value, seq, has_bias, has_res, w0, w1):
        """A plain accumulation-precision matrix (a weight gradient, narrowed afterwards)."""
        c0[i, j] = value

    return {"qkv": to_qkv, "output": to_output, "heads": to_heads, "matrix": to_matrix}


def _make_gemm(a, b, store_kind, dtype, t):
    load, store = _device.codec(dtype)
    loads_a, loads_b, _ = _readers(load)
    load_a, load_b, store = loads_a[a], loads_b[b], _writers(load, store)[store_kind]
    acc = _device.acc_type(dtype)
    zero = acc(0.0)
    rows, cols = 2 * t, 2 * t

    def gemm(a0, a1, a2, b0, c0, c1, c2, bias, res, m, n, kdim, seq, has_bias, has_res, w0, w1):
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        row0 = cuda.blockIdx.x * rows  # x: the token tiles, which may number more than 65535
        col0 = cuda.blockIdx.y * cols
        sa = cuda.shared.array((rows, t), acc)
        sb = cuda.shared.array((t, cols), acc)
        c00 = zero
        c01 = zero
        c10 = zero
        c11 = zero
        first = ty * t + tx
        for k0 in range(0, kdim, t):
            for e in range(first, rows * t, t * t):
                r, kk = e // t, e % t
                sa[r, kk] = zero
                if row0 + r < m and k0 + kk < kdim:
                    sa[r, kk] = load_a(a0, a1, a2, row0 + r, k0 + kk, seq, w0, w1)
            for e in range(first, t * cols, t * t):
                kk, cc = e // cols, e % cols
                sb[kk, cc] = zero
                if k0 + kk < kdim and col0 + cc < n:
                    sb[kk, cc] = load_b(b0, k0 + kk, col0 + cc, seq)
            cuda.syncthreads()
            for kk in range(t):
                a_0, a_1 = sa[ty, kk], sa[ty + t, kk]
                b_0, b_1 = sb[kk, tx], sb[kk, tx + t]
                c00 += a_0 * b_0
                c01 += a_0 * b_1
                c10 += a_1 * b_0
                c11 += a_1 * b_1
            cuda.syncthreads()
        for di, dj, value in ((0, 0, c00), (0, t, c01), (t, 0, c10), (t, t, c11)):
            i, j = row0 + ty + di, col0 + tx + dj
            if i < m and j < n:
                store(c0, c1, c2, bias, res, i, j, value, seq, has_bias, has_res, w0, w1)

    return gemm


def _make_column_sums(dtype):
    load = _device.codec(dtype)[0]
    sections = _readers(load)[2]
    zero = _device.acc_type(dtype)(0.0)

    def column_sums(a0, a1, a2, rows, cols, seq, w0, w1, out):
        """out[j] = sum over rows i of the three-section matrix (a bias gradient)."""
        j = cuda.grid(1)
        if j < cols:
            total = zero
            for i in range(rows):
                total += sections(a0, a1, a2, i, j, seq, w0, w1)
            out[j] = total

    return column_sums


def _gemm(a, b, store, dtype):
    t = config.cuda_proj_tile
    key = (a, b, store, np.dtype(dtype), t)
    if key not in _kernels:
        _kernels[key] = cuda.jit(_make_gemm(a, b, store, np.dtype(dtype), t))
    return _kernels[key]


def _column_sums(dtype):
    key = ("column_sums", np.dtype(dtype))
    if key not in _kernels:
        _kernels[key] = cuda.jit(_make_column_sums(np.dtype(dtype)))
    return _kernels[key]


def _launch_gemm(kernel, m, n, kdim, a_arrays, b0, c_arrays, bias, res, seq, has_bias, has_res,
                 w0, w1):
    t = config.cuda_proj_tile
    grid = (_launch.blocks(m, 2 * t), _launch.blocks(n, 2 * t))
    kernel[grid, (t, t)](*a_arrays, b0, *c_arrays, bias, res, m, n, kdim, seq, has_bias, has_res,
                         w0, w1)


# --- host side -------------------------------------------------------------------------

def _heads_view(x):
    """[B, S, P] as head layout [B, 1, S, P]; head layouts as they are."""
    shape = tuple(x.shape)
    return x if len(shape) == 4 else x.reshape(shape[0], 1, shape[1], shape[2])


def _dummy(dtype):
    return _launch.kernel_view(_launch.empty((1, 1, 1, 1), dtype))


def project_heads(x, weight, bias, sections, head_dim, pool=None, rotary=None, rotated=()):
    """x [B, S, K] @ weight.T (+ bias) split into head-layout device arrays [B, h, S, D].

    ``rotary`` (a :class:`~fastattn._validate.RotaryPlan`) turns the sections flagged in ``rotated``
    after the GEMM (the rotary kernel on each; the CPU fuses it into the epilogue)."""
    dtype = np.dtype(x.dtype)
    batch, seq, kdim = (int(s) for s in x.shape)
    outs = [_launch.empty((batch, h, seq, head_dim), dtype) for h in sections]
    views = [_launch.kernel_view(o) for o in outs] + [_dummy(dtype)] * (3 - len(outs))
    n = int(weight.shape[0])
    if batch * seq and n:
        widths = [h * head_dim for h in sections] + [0, 0]
        x2 = _launch.kernel_view(x).reshape(batch * seq, kdim)
        b = _launch.kernel_view(bias) if bias is not None else _launch.kernel_view(_launch.empty(1, dtype))
        _launch_gemm(_gemm("rows", "weight_t", "qkv", dtype), batch * seq, n, kdim, (x2, x2, x2),
                     _launch.kernel_view(weight), views, b, views[0], seq, bias is not None,
                     False, widths[0], widths[1])
    if rotary is not None:
        from .rotary import apply

        outs = [apply(o, rotary) if r else o for o, r in zip(outs, tuple(rotated) + (False,) * 3)]
    return outs


def _weight_grads(a_kind, grads, widths, x_heads, weight, seq, has_bias):
    """dweight [N, K] (= dY.T @ X) and dbias [N] (column sums of dY), in the dtype of the weight.

    ``x_heads`` is the kernel view of the activations X in head layout.
    """
    dtype = np.dtype(weight.dtype)
    acc_np = np.float64 if dtype == np.float64 else np.float32
    n, kdim = (int(s) for s in weight.shape)
    tokens = int(x_heads.shape[0]) * seq
    dw = _zeros((n, kdim), acc_np)
    db = _zeros((n,), acc_np)
    if tokens and n:
        _launch_gemm(_gemm(a_kind, "heads", "matrix", dtype), n, kdim, tokens, grads,
                     x_heads, (dw, dw, dw), db, db, seq, False, False, *widths)
        if has_bias:
            _column_sums(dtype)[_launch.blocks(n, 128), 128](*grads, tokens, n, seq, *widths, db)
    return _convert(dw, dtype), (_convert(db, dtype) if has_bias else None)


def qkv_backward(grads, x, weight, has_bias, pool=None, rotary=None, rotated=()):
    """(dx, dweight, dbias or None) on the device, from the head-layout q/k/v gradients.

    With ``rotary``, the grads of the sections flagged in ``rotated`` are first turned back."""
    if rotary is not None:
        from .rotary import unrotate

        grads = [unrotate(g, rotary) if r else g for g, r in zip(grads, tuple(rotated) + (False,) * 3)]
    dtype = np.dtype(x.dtype)
    batch, seq, kdim = (int(s) for s in x.shape)
    views = [_launch.kernel_view(g) for g in grads]
    widths = [int(g.shape[1]) * int(g.shape[3]) for g in grads] + [0, 0]
    widths = widths[:2]  # a column past both belongs to the third section
    views += views[:1] * (3 - len(views))  # sections that are absent are never read
    dx = _launch.empty((batch, seq, kdim), dtype)
    if batch * seq:
        dx_heads = _heads_view(_launch.kernel_view(dx))
        _launch_gemm(_gemm("sections", "weight", "heads", dtype), batch * seq, kdim, int(weight.shape[0]),
                     views, _launch.kernel_view(weight), (dx_heads,) * 3, dx_heads, dx_heads, seq,
                     False, False, *widths)
    dw, db = _weight_grads("sections_t", views, widths, _heads_view(_launch.kernel_view(x)), weight, seq,
                           has_bias)
    return dx, dw, db


def output_projection(attn, weight, bias, residual, pool=None):
    """attn ([B, S, P] or head layout) @ weight.T + bias + residual -> device array [B, S, H]."""
    dtype = np.dtype(attn.dtype)
    heads = _heads_view(_launch.kernel_view(attn))
    batch, _, seq, _ = (int(s) for s in heads.shape)
    n, kdim = (int(s) for s in weight.shape)
    y = _launch.empty((batch, seq, n), dtype)
    if batch * seq and n:
        a = heads
        yv = _launch.kernel_view(y)
        b = _launch.kernel_view(bias) if bias is not None else _launch.kernel_view(_launch.empty(1, dtype))
        res = _launch.kernel_view(residual) if residual is not None else yv
        _launch_gemm(_gemm("heads", "weight_t", "output", dtype), batch * seq, n, kdim, (a, a, a),
                     _launch.kernel_view(weight), (yv, yv, yv), b, res, seq, bias is not None,
                     residual is not None, 0, 0)
    return y


def output_backward(dy, attn, weight, has_bias, heads=None, pool=None):
    """(dattn, dweight, dbias or None, dresidual) on the device; ``heads``: dattn in head layout."""
    dtype = np.dtype(dy.dtype)
    batch, seq, n = (int(s) for s in dy.shape)
    p = int(weight.shape[1])
    dattn = _launch.empty((batch, heads, seq, p // heads) if heads else (batch, seq, p), dtype)
    dy_heads = _heads_view(_launch.kernel_view(dy))
    if batch * seq:
        out = _heads_view(_launch.kernel_view(dattn))
        _launch_gemm(_gemm("heads", "weight", "heads", dtype), batch * seq, p, n, (dy_heads,) * 3,
                     _launch.kernel_view(weight), (out,) * 3, out, out, seq, False, False, 0, 0)
    dw, db = _weight_grads("sections_t", (dy_heads,) * 3, (n, 0), _heads_view(_launch.kernel_view(attn)), weight,
                           seq, has_bias)
    dres = _launch.empty((batch, seq, n), dtype)
    if dres.size:
        _launch.kernel_view(dres).copy_to_device(_launch.kernel_view(dy))
    return dattn, dw, db, dres


# --- what cuda-report compiles -------------------------------------------------------

#: The products the family launches: (A reader, B reader, writer, ranks of A, B, C, bias, residual).
PRODUCTS = (("rows", "weight_t", "qkv", 2, 2, 4, 1, 4), ("sections", "weight", "heads", 4, 2, 4, 4, 4),
            ("sections_t", "heads", "matrix", 4, 4, 2, 1, 1), ("heads", "weight_t", "output", 4, 2, 3, 1, 3),
            ("heads", "weight", "heads", 4, 2, 4, 4, 4))


def _array(dtype, rank):
    return dtype[(slice(None),) * (rank - 1) + (slice(None, None, 1),)]


def variants(head_dims=None):
    """The GEMM kernels of this family in every dtype (for ``cuda-report``); no head-dim buckets."""
    from numba import boolean, int64

    from .._dtypes import dtype_named

    out = []
    for name in ("float32", "float64", "float16", "bfloat16"):
        dtype = dtype_named(name)
        x, acc = _device.element_type(dtype), _device.acc_type(dtype)
        for a, b, store, ra, rb, rc, rbias, rres in PRODUCTS:
            c_type = acc if store == "matrix" else x
            bias_type = acc if store == "matrix" else x
            sig = ((_array(x, ra),) * 3 + (_array(x, rb),) + (_array(c_type, rc),) * 3
                   + (_array(bias_type, rbias), _array(c_type if store == "matrix" else x, rres))
                   + (int64,) * 4 + (boolean, boolean, int64, int64))
            t = config.cuda_proj_tile
            out.append(_launch.Variant(f"gemm[{a},{b}->{store}]", "other", name, 0, t * t,
                                       _make_gemm(a, b, store, dtype, t), sig))
        sig = (_array(x, 4),) * 3 + (int64,) * 3 + (int64, int64, _array(acc, 1))
        out.append(_launch.Variant("column_sums", "other", name, 0, 128, _make_column_sums(dtype), sig))
    return out
