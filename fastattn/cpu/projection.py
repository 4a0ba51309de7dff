"""CPU kernels of the projection family: one multithreaded GEMM each, with a fused epilogue.

(Which threads run the GEMM: the last paragraph.)

Activations travel in "head layout" ``[B, G, S, Dg]``: the QKV projection's
outputs are ``[B, H, S, D]`` and the output projection's input may be
``[B, Hq, S, D]`` too (the layer passes attention's output as it comes); a
plain ``[B, S, P]`` array is the same thing with ``G = 1``.

Every GEMM is one call to NumPy's BLAS with all its threads on token-major
operands (``[B*S, K]``: a view of ``[B, S, K]`` inputs, gathered once from a
head layout).  The epilogues (the QKV bias and the scatter of each head's
columns into q, k or v; the output projection's bias and residual; the
rounding to half formats) and the gathers run in numba on **one** thread.
That is deliberate.  An earlier design ran a ``prange`` of single-threaded
BLAS tiles; on a 2-core machine it measured 1.5x the bare ``x @ W.T`` when
the two were called in turn, because NumPy's OpenBLAS threads keep spinning
for a while after each call and numba's OpenMP threads then fight them for
the cores (and spin in turn while the next GEMM runs).  With the GEMMs on
one thread pool and the epilogues on the calling thread, there is no second
pool to fight.  The weight gradients are ``dY.T @ x`` in one GEMM: the same
bits every run at a given BLAS thread count.  Half-precision inputs are
decoded to float32 once, before the GEMMs.

The same holds the other way round: numba kernels that follow a NumPy GEMM
run up to 2x slower while OpenBLAS's threads spin.  The attention layer,
whose projections sit between numba's attention kernels, therefore passes
``pool="numba"``: each GEMM is split into one row block per numba thread
(:func:`_split_matmul`, :func:`_split_weight_grad`), and the whole layer
stays on numba's threads.  There each block runs on :mod:`._gemm`'s float32
micro-kernels where numba's target has AVX-512 (the weight packed in blocks
of 256 x 64 first: 376-412 GFLOP/s on the 2-core Zen 5 against 232-246 for
single-threaded OpenBLAS there, and 248 for NumPy's multithreaded GEMM), else
a single-threaded BLAS call.  That pool is then the faster one even right
after a NumPy GEMM (the public projections measured 0.58-0.97x the bare
``x @ W.T`` timed in turn with it), so the default pool, "auto", is numba's
where the micro-kernels run and NumPy's elsewhere.
"""
import numpy as np
from numba import njit, prange

from .._config import config
from .._dtypes import accum_dtype, bits_view, codec_of
from ._blas import single_threaded_blas
from ._gemm import KC, PANEL, matmul_packed, matmul_packed_tn, simd_gemm
from ._fastmath import FASTMATH, decode_rows, encode_row
from .rotary import plan as rotary_plan, rotate_row

_JIT = dict(cache=True, fastmath=FASTMATH, nogil=True)  # one thread each: see the module docstring


@njit(**_JIT)
def _widen_rows(src, codec, dst):
    """dst [R, C] (float32/64) = decoded src [R, C] (bits)."""
    decode_rows(src, dst, codec)


@njit(**_JIT)
def _narrow_rows(src, codec, dst):
    """dst [R, C] (bits) = src [R, C] (float32/64), rounded to nearest even."""
    for r in range(src.shape[0]):
        encode_row(src[r], dst[r], codec)


@njit(**_JIT)
def _head_of(g, n_first, n_second):
    """(section 0/1/2, head within it) of global head g."""
    if g < n_first:
        return 0, g
    if g < n_first + n_second:
        return 1, g - n_first
    return 2, g - n_first - n_second


@njit(**_JIT)
def _qkv_epilogue(y, bias, has_bias, seq, out0, out1, out2, codec, cos, sin, positions, rotated, interleaved):
    """out0/1/2 [B, Hi, S, D] = each head's columns of y [B*S, N] (+ bias), encoded in the outputs' dtype.

    Heads of section ``i`` with bit ``i`` of ``rotated`` set are turned by the rotary tables ``cos``/``sin``
    at ``positions[b or 0, s]`` first (:func:`~fastattn.cpu.rotary.rotate_row`)."""
    dim = out0.shape[3]
    h0, h1 = out0.shape[1], out1.shape[1]
    n_heads = y.shape[1] // dim
    for t in range(y.shape[0]):
        b = t // seq
        s = t - b * seq
        row = y[t]
        if has_bias:
            row += bias
        p = positions[b if positions.shape[0] > 1 else 0, s] if rotated else 0
        for g in range(n_heads):
            section, h = _head_of(g, h0, h1)
            dst = out0 if section == 0 else out1 if section == 1 else out2
            part = row[g * dim:(g + 1) * dim]
            if rotated & (1 << section):
                rotate_row(part, cos[p], sin[p], interleaved, cos.dtype.type(1))
            encode_row(part, dst[b, h, s], codec)


@njit(**_JIT)
def _output_epilogue(y, bias, has_bias, residual, has_residual, out, codec, in_place):
    """out [T, N] = y [T, N] + bias + residual [T, N] (bits), encoded; ``in_place``: out is y."""
    n = y.shape[1]
    zero = y.dtype.type(0)
    if codec == 0 and in_place:  # float inputs: one pass, y updated where it is
        for t in range(y.shape[0]):
            for c in range(n):
                y[t, c] += (residual[t, c] if has_residual else zero) + (bias[c] if has_bias else zero)
        return
    row = np.empty((1, n), y.dtype)
    for t in range(y.shape[0]):
        if has_residual:
            decode_rows(residual[t:t + 1], row, codec)
            y[t] += row[0]
        if has_bias:
            y[t] += bias
        if not in_place:
            encode_row(y[t], out[t], codec)


@njit(**_JIT)
def _gather_heads(src, b, s0, m, tile, col0, codec):
    """tile[:, col0 + g*Dg : ...] = decoded src[b, g, s0:s0+m, :] for every head g of a head-layout array."""
    dg = src.shape[3]
    for g in range(src.shape[1]):
        decode_rows(src[b, g, s0:s0 + m], tile[:, col0 + g * dg:col0 + (g + 1) * dg], codec)


@njit(**_JIT)
def _token_rows(g0_, g1_, g2_, codec, out, sums, cos, sin, positions, rotated, interleaved):
    """out [B*S, N] = the head-layout arrays g0_, g1_, g2_ [B, Gi, S, Dg] side by side, token-major, decoded;
    with ``sums`` of length N, also its column sums (token order, while the rows are in cache).  The heads
    of array ``i`` with bit ``i`` of ``rotated`` are turned back by the rotary tables on the way (a fused
    backward of :func:`fastattn.rotary`)."""
    batch, seq = g0_.shape[0], g0_.shape[2]
    block = 64
    back = -cos.dtype.type(1)
    for b in range(batch):
        for s0 in range(0, seq, block):
            m = min(block, seq - s0)
            rows = out[b * seq + s0:b * seq + s0 + m]
            col = 0
            for i, src in enumerate((g0_, g1_, g2_)):
                _gather_heads(src, b, s0, m, rows, col, codec)
                dg = src.shape[3]
                if rotated & (1 << i):
                    for r in range(m):
                        p = positions[b if positions.shape[0] > 1 else 0, s0 + r]
                        for g in range(src.shape[1]):
                            rotate_row(rows[r, col + g * dg:col + (g + 1) * dg], cos[p], sin[p], interleaved, back)
                col += src.shape[1] * dg
            if sums.shape[0]:
                for r in range(m):
                    sums += rows[r]


@njit(parallel=True, **_JIT)
def _split_matmul(a, b, out, n_tasks, simd):
    """out [M, N] = a [M, K] @ b [K, N], one block of rows of ``a`` per task (:func:`._gemm.matmul_packed`:
    micro-kernels on packed blocks of ``b``, or single-threaded BLAS)."""
    per = (a.shape[0] + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        r0 = task * per
        r1 = min(a.shape[0], r0 + per)
        if r0 < r1:
            matmul_packed(a[r0:r1], b, out[r0:r1], np.empty(KC * PANEL, out.dtype), simd)


@njit(parallel=True, **_JIT)
def _split_weight_grad(dy, x2d, dw, n_tasks, simd):
    """dw [N, K] = dy [T, N].T @ x2d [T, K], one block of dw's rows per task (each sums every token)."""
    n = dy.shape[1]
    per = (n + n_tasks - 1) // n_tasks
    for task in prange(n_tasks):
        n0 = task * per
        n1 = min(n, n0 + per)
        if n0 < n1:
            matmul_packed_tn(dy[:, n0:n1], x2d, dw[n0:n1], np.empty(KC * PANEL, dw.dtype), simd)


# --- host side ---------------------------------------------------------------------

def _wide(x, acc):
    """A C-contiguous array of x in the accumulation dtype (decoded once for half formats)."""
    x = np.ascontiguousarray(x)
    if x.dtype == acc:
        return x
    if codec_of(x.dtype) == 0:
        return x.astype(acc)
    out = np.empty(x.shape, acc)
    if x.size:
        _widen_rows(bits_view(x).reshape(-1, x.shape[-1]), codec_of(x.dtype), out.reshape(-1, x.shape[-1]))
    return out


def _narrow(x, dtype):
    """x (accumulation dtype) in dtype, rounding to nearest even."""
    if x.dtype == dtype:
        return x
    out = np.empty(x.shape, dtype)
    if x.size:
        shape = (-1, x.shape[-1]) if x.ndim > 1 else (1, -1)
        _narrow_rows(x.reshape(shape), codec_of(dtype), bits_view(out).reshape(shape))
    return out


def _pool(pool):
    """The pool a projection GEMM runs on: ``pool``, else :attr:`fastattn.config.cpu_proj_pool`, with
    "auto" resolved ("numba" where the tile products run on the micro-kernels, else "numpy")."""
    choice = pool or config.cpu_proj_pool
    if choice not in ("auto", "numpy", "numba"):
        raise ValueError(f"fastattn.config.cpu_proj_pool: expected 'auto', 'numpy' or 'numba', got {choice!r}")
    if choice == "auto":
        return "numba" if simd_gemm() else "numpy"
    return choice


def _matmul(a, b, pool):
    """a @ b on NumPy's BLAS (``pool="numpy"``) or split over numba's threads (``"numba"``; ``b`` C- or
    Fortran-contiguous, e.g. a weight's transpose); ``None``: :attr:`fastattn.config.cpu_proj_pool`."""
    if _pool(pool) == "numpy":
        return np.matmul(a, b)
    out = np.empty((a.shape[0], b.shape[1]), np.result_type(a, b))
    with single_threaded_blas():
        _split_matmul(np.ascontiguousarray(a), b, out, _threads(), simd_gemm())
    return out


def _weight_grad(dy, x2d, pool):
    """dy.T @ x2d (the weight gradient) on the chosen pool."""
    if _pool(pool) == "numpy":
        return np.matmul(dy.T, x2d)
    dw = np.empty((dy.shape[1], x2d.shape[1]), dy.dtype)
    with single_threaded_blas():
        _split_weight_grad(dy, np.ascontiguousarray(x2d), dw, _threads(), simd_gemm())
    return dw


def _threads():
    from numba import get_num_threads

    return get_num_threads()


def _as_heads(x):
    """A [B, S, P] array as head layout [B, 1, S, P] (a view); head layouts as they are."""
    return x if x.ndim == 4 else x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])


def _tokens_major(arrays, batch, seq, acc, with_sums=False, rotary=None, rotated=()):
    """``[B*S, N]`` in ``acc``: head-layout arrays ``[B, Gi, S, Dg]`` side by side, token by token
    (a view of one ``[B, 1, S, N]`` array already in ``acc``); with ``with_sums``, ``(that, its
    column sums)``.  ``rotary``: the arrays flagged in ``rotated`` are turned back on the way."""
    flags = tuple(rotated) + (False,) * 3
    kept = [i for i, a in enumerate(arrays) if a.shape[1] * a.shape[3]]
    arrays = [arrays[i] for i in kept]
    rot_bits = sum(1 << j for j, i in enumerate(kept) if flags[i]) if rotary is not None else 0
    if len(arrays) == 1 and arrays[0].shape[1] == 1 and not rot_bits:
        out = _wide(arrays[0], acc).reshape(batch * seq, -1)
        return (out, out.sum(axis=0)) if with_sums else out
    n = sum(a.shape[1] * a.shape[3] for a in arrays)
    out = np.empty((batch * seq, n), acc)
    sums = np.zeros(n if with_sums else 0, acc)
    if out.size:
        views = [bits_view(np.ascontiguousarray(a)) for a in arrays]
        views += [views[0][:, :0]] * (3 - len(views))
        cos, sin, positions, interleaved = rotary_plan(rotary, arrays[0].dtype)
        _token_rows(*views, codec_of(arrays[0].dtype), out, sums, cos, sin, positions, rot_bits, interleaved)
    return (out, sums) if with_sums else out


def project_heads(x, weight, bias, sections, head_dim, pool=None, rotary=None, rotated=()):
    """x [B, S, K] @ weight.T (+ bias) split into head-layout outputs [B, h, S, D] for h in sections.

    ``pool``: whose threads run the GEMM, NumPy's BLAS (``"numpy"``) or numba's (``"numba"``);
    None takes :attr:`fastattn.config.cpu_proj_pool`.  ``rotary`` (a
    :class:`~fastattn._validate.RotaryPlan`) turns the sections flagged in
    ``rotated`` in the epilogue, as :func:`fastattn.rotary` would after it.
    """
    dtype = np.dtype(x.dtype)
    acc = accum_dtype(dtype)
    batch, seq, k_in = x.shape
    outs = [np.empty((batch, h, seq, head_dim), dtype) for h in sections]
    while len(outs) < 3:
        outs.append(np.empty((batch, 0, seq, head_dim), dtype))
    if x.size and weight.shape[0]:
        y = _matmul(_wide(x, acc).reshape(batch * seq, k_in), _wide(weight, acc).T, pool)
        b = _wide(bias, acc) if bias is not None else np.zeros(0, acc)
        rot_bits = sum(1 << i for i, r in enumerate(rotated) if r) if rotary is not None else 0
        cos, sin, positions, interleaved = rotary_plan(rotary, dtype)
        _qkv_epilogue(y, b, bias is not None, seq, *(bits_view(o) for o in outs), codec_of(dtype), cos, sin,
                      positions, rot_bits, interleaved)
    else:
        for o in outs:
            o.fill(0)
    return outs[:len(sections)]


def _backward(grads, x2d, weight, batch, seq, acc, pool, rotary=None, rotated=()):
    """(dx [T, K], dweight [N, K], dbias [N]) in ``acc``: ``dx = dY @ weight``, ``dweight = dY.T @ x2d``
    and dY's column sums, where dY [T, N] is the head-layout grads side by side, token-major (the
    ``rotated`` ones turned back by ``rotary`` on the way)."""
    tokens = batch * seq
    dy, dbias = _tokens_major(grads, batch, seq, acc, with_sums=True, rotary=rotary, rotated=rotated)
    if tokens == 0 or dy.shape[1] == 0:
        return (np.zeros((tokens, weight.shape[1]), acc), np.zeros(weight.shape, acc),
                np.zeros(weight.shape[0], acc))
    return _matmul(dy, _wide(weight, acc), pool), _weight_grad(dy, x2d, pool), dbias


def qkv_backward(grads, x, weight, has_bias, pool=None, rotary=None, rotated=()):
    """(dx [B, S, K], dweight [N, K], dbias [N] or None) from head-layout grads of the QKV outputs.

    With ``rotary``, the grads of the sections flagged in ``rotated`` are turned back
    (:func:`fastattn.rotary_backward`) while they are gathered token-major for the GEMMs."""
    dtype = np.dtype(x.dtype)
    acc = accum_dtype(dtype)
    batch, seq, k_in = x.shape
    dx, dw, db = _backward(grads, _wide(x, acc).reshape(batch * seq, k_in), weight, batch, seq, acc, pool,
                           rotary, rotated)
    return _narrow(dx.reshape(x.shape), dtype), _narrow(dw, dtype), _narrow(db, dtype) if has_bias else None


def output_projection(attn, weight, bias, residual, pool=None):
    """attn ([B, S, P] or head layout [B, Hq, S, D]) @ weight.T + bias + residual -> [B, S, H]."""
    dtype = np.dtype(attn.dtype)
    acc = accum_dtype(dtype)
    heads = _as_heads(attn)
    batch, seq = heads.shape[0], heads.shape[2]
    n_out = weight.shape[0]
    if batch * seq == 0 or n_out == 0:
        return np.zeros((batch, seq, n_out), dtype)
    y = _matmul(_tokens_major([heads], batch, seq, acc), _wide(weight, acc).T, pool)
    in_place = dtype == acc
    out = y if in_place else np.empty((batch * seq, n_out), dtype)
    res = bits_view(np.ascontiguousarray(residual)).reshape(batch * seq, n_out) if residual is not None \
        else bits_view(out[:0])
    b = _wide(bias, acc) if bias is not None else np.zeros(0, acc)
    _output_epilogue(y, b, bias is not None, res, residual is not None, bits_view(out), codec_of(dtype), in_place)
    return out.reshape(batch, seq, n_out)


def output_backward(dy, attn, weight, has_bias, heads=None, pool=None):
    """(dattn, dweight, dbias or None, dresidual) of :func:`output_projection`.

    With ``heads`` the input gradient comes back in head layout ``[B, heads, S, P // heads]``.
    """
    dtype = np.dtype(dy.dtype)
    acc = accum_dtype(dtype)
    batch, seq, _ = dy.shape
    p = weight.shape[1]
    a2d = _tokens_major([_as_heads(attn)], batch, seq, acc)
    dattn, dw, db = _backward([_as_heads(dy)], a2d, weight, batch, seq, acc, pool)
    dattn = dattn.reshape(batch, seq, p)
    if heads:
        dattn = dattn.reshape(batch, seq, heads, p // heads).transpose(0, 2, 1, 3)
    return (_narrow(np.ascontiguousarray(dattn), dtype), _narrow(dw, dtype), _narrow(db, dtype) if has_bias else None,
            dy.copy())
