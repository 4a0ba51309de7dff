"""CPU kernels of the projection family: GEMMs through BLAS with fused epilogues.

Activations travel in "head layout" ``[B, G, S, Dg]``: the QKV projection's
outputs are ``[B, H, S, D]`` and the output projection's input may be
``[B, Hq, S, D]`` too (the layer passes attention's output as it comes); a
plain ``[B, S, P]`` array is the same thing with ``G = 1``.  A tile of ``m``
tokens of one sequence is then a contiguous ``[m, Dg]`` block per head, so
the kernels read and write head layouts in place: the QKV epilogue adds the
bias and scatters each head's columns straight into q, k or v, with no
``[B, S, 3 * ...]`` intermediate and no transposition pass.

Tasks: forward and input-gradient kernels own (sequence, tile of tokens, block
of output columns); weight-gradient kernels own blocks of weight rows and sum
over every token in a fixed order (deterministic, no races).  Half-precision
inputs are decoded to float32 once, before the GEMMs.
"""
import numpy as np
from numba import njit, prange

from .._config import config
from .._dtypes import accum_dtype, bits_view, codec_of
from ._blas import single_threaded_blas
from ._fastmath import FASTMATH, decode_rows, encode_row

_JIT = dict(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)


@njit(**_JIT)
def _widen_rows(src, codec, dst):
    """dst [R, C] (float32/64) = decoded src [R, C] (bits)."""
    block = 64
    for task in prange((src.shape[0] + block - 1) // block):
        r0 = task * block
        r1 = min(src.shape[0], r0 + block)
        decode_rows(src[r0:r1], dst[r0:r1], codec)


@njit(fastmath=FASTMATH, cache=True)
def _head_of(g, n_first, n_second):
    """(section 0/1/2, head within it) of global head g."""
    if g < n_first:
        return 0, g
    if g < n_first + n_second:
        return 1, g - n_first
    return 2, g - n_first - n_second


@njit(**_JIT)
def _qkv_forward(x, w, bias, has_bias, seq, out0, out1, out2, codec, block_m, heads_per_task):
    """x [B*S, K], w [N, K] with N = (H0+H1+H2)*D: write each head's columns into out0/1/2 [B, Hi, S, D]."""
    dim = out0.shape[3]
    h0, h1 = out0.shape[1], out1.shape[1]
    n_heads = w.shape[0] // dim
    batch = x.shape[0] // seq
    n_tiles = (seq + block_m - 1) // block_m
    n_blocks = (n_heads + heads_per_task - 1) // heads_per_task
    for task in prange(batch * n_tiles * n_blocks):
        blk = task % n_blocks
        tile = (task // n_blocks) % n_tiles
        b = task // (n_blocks * n_tiles)
        s0 = tile * block_m
        m = min(block_m, seq - s0)
        g0 = blk * heads_per_task
        g1 = min(n_heads, g0 + heads_per_task)
        y = np.dot(x[b * seq + s0:b * seq + s0 + m], w[g0 * dim:g1 * dim].T)
        if has_bias:
            for r in range(m):
                y[r] += bias[g0 * dim:g1 * dim]
        for g in range(g0, g1):
            section, h = _head_of(g, h0, h1)
            dst = out0 if section == 0 else out1 if section == 1 else out2
            for r in range(m):
                encode_row(y[r, (g - g0) * dim:(g - g0 + 1) * dim], dst[b, h, s0 + r], codec)


@njit(fastmath=FASTMATH, cache=True)
def _gather_heads(src, b, s0, m, tile, col0, codec):
    """tile[:, col0 + g*Dg : ...] = decoded src[b, g, s0:s0+m, :] for every head g of a head-layout array."""
    dg = src.shape[3]
    for g in range(src.shape[1]):
        decode_rows(src[b, g, s0:s0 + m], tile[:, col0 + g * dg:col0 + (g + 1) * dg], codec)


@njit(**_JIT)
def _output_forward(a, w, bias, has_bias, residual, has_residual, y, codec, block_m, block_n):
    """y [B, S, N] = a (head layout [B, G, S, Dg], G*Dg = K) @ w [N, K].T + bias + residual."""
    batch, _, seq, _ = a.shape
    n_out, k_in = w.shape
    n_tiles = (seq + block_m - 1) // block_m
    n_blocks = (n_out + block_n - 1) // block_n
    acc_t = w.dtype
    for task in prange(batch * n_tiles * n_blocks):
        blk = task % n_blocks
        tile = (task // n_blocks) % n_tiles
        b = task // (n_blocks * n_tiles)
        s0 = tile * block_m
        m = min(block_m, seq - s0)
        c0 = blk * block_n
        c1 = min(n_out, c0 + block_n)
        at = np.empty((m, k_in), acc_t)
        _gather_heads(a, b, s0, m, at, 0, codec)
        out = np.dot(at, w[c0:c1].T)
        row = np.empty(c1 - c0, acc_t)
        for r in range(m):
            if has_residual:
                decode_rows(residual[b, s0 + r:s0 + r + 1, c0:c1], row.reshape(1, c1 - c0), codec)
                out[r] += row
            if has_bias:
                out[r] += bias[c0:c1]
            encode_row(out[r], y[b, s0 + r, c0:c1], codec)


@njit(**_JIT)
def _input_grad(g0_, g1_, g2_, w, dx, codec, block_m):
    """dx [B, S, K] (or head layout [B, G, S, Dg]) = dY @ w, dY gathered per tile from the head-layout grads."""
    batch, seq = g0_.shape[0], g0_.shape[2]
    n_out, k_in = w.shape
    n_tiles = (seq + block_m - 1) // block_m
    acc_t = w.dtype
    for task in prange(batch * n_tiles):
        tile = task % n_tiles
        b = task // n_tiles
        s0 = tile * block_m
        m = min(block_m, seq - s0)
        dy = np.empty((m, n_out), acc_t)
        col = 0
        for grads in (g0_, g1_, g2_):
            _gather_heads(grads, b, s0, m, dy, col, codec)
            col += grads.shape[1] * grads.shape[3]
        out = np.dot(dy, w)
        dg = dx.shape[3]
        for g in range(dx.shape[1]):
            for r in range(m):
                encode_row(out[r, g * dg:(g + 1) * dg], dx[b, g, s0 + r], codec)


@njit(**_JIT)
def _weight_grad(g0_, g1_, g2_, x, dw, dbias, block_m, rows_per_task):
    """dw [N, K] = dY.T @ x and dbias [N] = column sums of dY, each task owning rows_per_task rows of dw.

    dY's column n is row n of dw; it lives in head ``n // Dg`` of the section
    (g0_, g1_ or g2_, head-layout grads) that holds it.  x is head layout too.
    """
    batch, seq = g0_.shape[0], g0_.shape[2]
    n_out, k_in = dw.shape
    n_tiles = (seq + block_m - 1) // block_m
    n_tasks = (n_out + rows_per_task - 1) // rows_per_task
    acc_t = dw.dtype
    for task in prange(n_tasks):
        n0 = task * rows_per_task
        n1 = min(n_out, n0 + rows_per_task)
        acc = np.zeros((n1 - n0, k_in), acc_t)
        bias_acc = np.zeros(n1 - n0, acc_t)
        dy = np.empty((block_m, n1 - n0), acc_t)
        xt = np.empty((block_m, k_in), acc_t)
        for b in range(batch):
            for tile in range(n_tiles):
                s0 = tile * block_m
                m = min(block_m, seq - s0)
                _gather_columns(g0_, g1_, g2_, b, s0, m, n0, n1, dy)
                if x.shape[1] == 1:  # [B, S, K] rows: already a contiguous tile
                    acc += np.dot(dy[:m].T, x[b, 0, s0:s0 + m])
                else:
                    _gather_heads(x, b, s0, m, xt[:m], 0, 0)
                    acc += np.dot(dy[:m].T, xt[:m])
                for r in range(m):
                    bias_acc += dy[r]
        dw[n0:n1] = acc
        dbias[n0:n1] = bias_acc


@njit(fastmath=FASTMATH, cache=True)
def _gather_columns(g0_, g1_, g2_, b, s0, m, n0, n1, dy):
    """dy[:m, :] = columns n0..n1 of the concatenated head-layout grads, tokens s0..s0+m of sequence b."""
    c = n0
    while c < n1:
        start = 0
        for grads in (g0_, g1_, g2_):
            width = grads.shape[1] * grads.shape[3]
            if start <= c < start + width:
                dg = grads.shape[3]
                h = (c - start) // dg
                d0 = (c - start) % dg
                d1 = min(dg, d0 + n1 - c)
                dy[:m, c - n0:c - n0 + d1 - d0] = grads[b, h, s0:s0 + m, d0:d1]
                c += d1 - d0
                break
            start += width


# --- host side ---------------------------------------------------------------------

def _tiles(tiles_of, block_m, block_n, seq, n_out):
    """(block_m, block_n) from the config, halved until there are two tasks per thread.

    Large tiles run BLAS best; ``tiles_of(m, n)`` counts the tasks they make.
    """
    m, n = max(1, min(block_m, seq)), max(1, min(block_n, n_out))
    want = 2 * _threads()
    while tiles_of(m, n) < want and (m > 32 or n > 64):
        if n > 64 and n >= m:
            n //= 2
        else:
            m //= 2
    return m, n


def _wide(x, acc):
    """A C-contiguous array of x in the accumulation dtype (decoded once for half formats)."""
    x = np.ascontiguousarray(x)
    if x.dtype == acc:
        return x
    if codec_of(x.dtype) == 0:
        return x.astype(acc)
    out = np.empty(x.shape, acc)
    _widen_rows(bits_view(x).reshape(-1, x.shape[-1]), codec_of(x.dtype), out.reshape(-1, x.shape[-1]))
    return out


def _as_heads(x):
    """A [B, S, P] array as head layout [B, 1, S, P] (a view); head layouts as they are."""
    return x if x.ndim == 4 else x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])


def project_heads(x, weight, bias, sections, head_dim):
    """x [B, S, K] @ weight.T (+ bias) split into head-layout outputs [B, h, S, D] for h in sections."""
    dtype = np.dtype(x.dtype)
    acc = accum_dtype(dtype)
    batch, seq, _ = x.shape
    outs = [np.empty((batch, h, seq, head_dim), dtype) for h in sections]
    while len(outs) < 3:
        outs.append(np.empty((batch, 0, seq, head_dim), dtype))
    if x.size and weight.shape[0]:
        w = _wide(weight, acc)
        b = _wide(bias, acc) if bias is not None else np.zeros(0, acc)
        n_heads = weight.shape[0] // head_dim
        m, n = _tiles(lambda m, n: batch * -(-seq // m) * -(-n_heads // max(1, n // head_dim)),
                      config.cpu_proj_block_m, config.cpu_proj_block_n, seq, weight.shape[0])
        with single_threaded_blas():
            _qkv_forward(_wide(x, acc).reshape(batch * seq, -1), w, b, bias is not None, seq,
                         *(bits_view(o) for o in outs), codec_of(dtype), m, max(1, n // head_dim))
    return outs[:len(sections)]


def qkv_backward(grads, x, weight, has_bias):
    """(dx [B, S, K], dweight [N, K], dbias [N] or None) from head-layout grads of the QKV outputs."""
    dtype = np.dtype(x.dtype)
    acc = accum_dtype(dtype)
    grads = list(grads) + [np.empty((x.shape[0], 0, x.shape[1], 1), dtype)] * (3 - len(grads))
    dx = np.empty(x.shape, dtype)
    dweight, dbias = _weight_and_bias_grads(grads, _as_heads(x), weight, acc)
    if x.size:
        views = [bits_view(np.ascontiguousarray(g)) for g in grads]
        with single_threaded_blas():
            _input_grad(*views, _wide(weight, acc), bits_view(_as_heads(dx)), codec_of(dtype),
                        _rows_for_input_grad(x.shape[0], x.shape[1]))
    else:
        dx.fill(0)
    return dx, dweight, dbias if has_bias else None


def _rows_for_input_grad(batch, seq):
    return _tiles(lambda m, n: batch * -(-seq // m), config.cpu_proj_block_m, 1, seq, 1)[0]


def _weight_and_bias_grads(grads, x_heads, weight, acc):
    dtype = np.dtype(weight.dtype)
    dw = np.zeros(weight.shape, acc)
    db = np.zeros(weight.shape[0], acc)
    if x_heads.shape[0] * x_heads.shape[2] and weight.size:
        wide = [_wide(g, acc) for g in grads]
        while len(wide) < 3:  # the kernel takes three sections; absent ones have no heads
            wide.append(np.zeros((x_heads.shape[0], 0, x_heads.shape[2], 1), acc))
        per_task = max(1, -(-weight.shape[0] // (4 * _threads())))
        with single_threaded_blas():
            _weight_grad(*wide, _wide(x_heads, acc), dw, db, config.cpu_proj_block_m, per_task)
    return _narrow(dw, dtype), _narrow(db, dtype)


def _narrow(x, dtype):
    """x (accumulation dtype) in dtype, rounding to nearest even."""
    if x.dtype == dtype:
        return x
    out = np.empty(x.shape, dtype)
    if x.size:
        _narrow_rows(x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1), codec_of(dtype),
                     bits_view(out).reshape(-1, x.shape[-1]) if x.ndim > 1 else bits_view(out).reshape(1, -1))
    return out


@njit(**_JIT)
def _narrow_rows(src, codec, dst):
    for r in prange(src.shape[0]):
        encode_row(src[r], dst[r], codec)


def _threads():
    from numba import get_num_threads

    return get_num_threads()


def output_projection(attn, weight, bias, residual):
    """attn ([B, S, P] or head layout [B, Hq, S, D]) @ weight.T + bias + residual -> [B, S, H]."""
    dtype = np.dtype(attn.dtype)
    acc = accum_dtype(dtype)
    heads = _as_heads(attn)
    batch, seq = heads.shape[0], heads.shape[2]
    y = np.empty((batch, seq, weight.shape[0]), dtype)
    if y.size:
        res = bits_view(np.ascontiguousarray(residual)) if residual is not None else bits_view(y[:0])
        b = _wide(bias, acc) if bias is not None else np.zeros(0, acc)
        n_out = weight.shape[0]
        m, n = _tiles(lambda m, n: batch * -(-seq // m) * -(-n_out // n), config.cpu_proj_block_m,
                      config.cpu_proj_block_n, seq, n_out)
        with single_threaded_blas():
            _output_forward(bits_view(np.ascontiguousarray(heads)), _wide(weight, acc), b, bias is not None,
                            res, residual is not None, bits_view(y), codec_of(dtype), m, n)
    return y


def output_backward(dy, attn, weight, has_bias, heads=None):
    """(dattn, dweight, dbias or None, dresidual) of :func:`output_projection`.

    With ``heads`` the input gradient comes back in head layout ``[B, heads, S, P // heads]``.
    """
    dtype = np.dtype(dy.dtype)
    acc = accum_dtype(dtype)
    batch, seq, _ = dy.shape
    p = weight.shape[1]
    dattn = np.empty((batch, heads, seq, p // heads) if heads else (batch, seq, p), dtype)
    dy_heads = _as_heads(np.ascontiguousarray(dy))
    dweight, dbias = _weight_and_bias_grads([dy_heads], _as_heads(attn), weight, acc)
    if dy.size and p:
        empty = bits_view(np.empty((batch, 0, seq, 1), dtype))
        with single_threaded_blas():
            _input_grad(bits_view(dy_heads), empty, empty, _wide(weight, acc), bits_view(_as_heads(dattn)),
                        codec_of(dtype), _rows_for_input_grad(batch, seq))
    else:
        dattn.fill(0)
    return dattn, dweight, dbias if has_bias else None, dy.copy()
