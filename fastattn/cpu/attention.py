"""CPU kernels of the dense attention family.

Forward: one task per (batch, query head, tile of ``block_q`` query rows); the
two GEMMs per key tile run on contiguous tiles (float32: :mod:`._gemm`'s
register micro-kernels where the CPU has AVX-512, else BLAS's ``np.dot``) and
the online softmax runs in between with a vectorised exponential.

Backward (FlashAttention-2 style): probabilities are recomputed from ``lse``,
``delta = rowsum(dout * out)`` is computed once, and each task owns a tile of
keys of one KV head, so dk/dv are written by exactly one task (no races, the
same bits every run).  dq is summed per task into its own slice of a partial
buffer (one slice per key split) and reduced in a fixed order afterwards.
"""
import numpy as np
from numba import njit, prange

from .._config import config
from .._dtypes import accum_dtype as _accum_dtype, bits_view, codec_of
from .._tile import finish_lse, key_range
from .._validate import element_strides
from ._blas import single_threaded_blas
from ._gemm import add_matmul, matmul_nt, pack_transposed, simd_gemm
from ._scratch import scratch
from ._fastmath import FASTMATH, encode_row
from ._tiles import (backward_buffers, decode_tile, dropout_tile, extra_tile, key_tile_backward, no_dropout,
                     no_extra, row_of, set_lse, softmax_tile, tile_rows)

_JIT = dict(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)


@njit(fastmath=FASTMATH, cache=True, nogil=True)
def _query_tile(q, k, v, at_q, at_k, b, h, hk, i0, m, sq, sk, codec, scale, wl, wr, shift, softcap, slopes,
                has_alibi, extra, drop, drop_scale, out, lse, block_k, simd):
    """Output rows ``i0 : i0 + m`` of query head ``h`` of sequence ``b`` (its ``sq`` rows against ``sk`` keys).

    Inputs are dense ``[B, H, S, D]`` or packed ``[total, H, D]``, a sequence's rows
    :func:`~fastattn.cpu._tiles.decode_tile` ``(q, at_q[0], h, at_q[1] + i)`` (keys likewise with ``at_k``):
    ``at = (b, 0)`` for a batch of a dense array, ``(0, start)`` for a sequence of a packed batch
    (read in place).  Outputs are ``[B, H, S, D]`` (lse ``[B, H, S]``) indexed like q, or the
    packed ``[total, H, D]`` (lse ``[H, total]``) at row ``start + i``.  ``b`` picks the ALiBi slopes and
    the bias/mask of :func:`extra_tile`.  ``drop_scale > 0``: dropout on the probabilities after their
    sum is taken (:func:`~fastattn.cpu._tiles.dropout_tile`, ``drop_scale = 1 / (1 - p)``).
    ``simd``: float32 products on :mod:`~fastattn.cpu._gemm`'s micro-kernels (else BLAS).
    """
    dim = q.shape[-1]
    qa, q0 = at_q
    ka, k0 = at_k
    sq_d = sq - shift  # the mask helpers put row i on key i + sk - sq_d
    acc_t = lse.dtype
    qt = np.empty((m, dim), acc_t)
    decode_tile(q, qa, h, q0 + i0, m, qt, codec)
    qt *= scale
    acc = np.zeros((m, dim), acc_t)
    row_max = np.full(m, -np.inf, acc_t)
    row_sum = np.zeros(m, acc_t)
    j_lo = key_range(i0, sq_d, sk, wl, wr)[0]
    j_hi = key_range(i0 + m - 1, sq_d, sk, wl, wr)[1]
    # tile buffers made once per task: a malloc per tile can cost a page fault each time
    # (e.g. under dask's MALLOC_TRIM_THRESHOLD_), which halved the speed in worker processes
    k_buf = np.empty((block_k, dim), acc_t)
    v_buf = np.empty((block_k, dim), acc_t)
    s_buf = np.empty(m * block_k, acc_t)
    pv = np.empty((m, dim), acc_t)
    panels = np.empty(block_k * dim, acc_t)
    has_extra = extra[3] or extra[6]
    e_buf = np.empty(m * block_k if has_extra else 0, acc_t)
    for j0 in range(j_lo, j_hi, block_k):
        n = min(block_k, j_hi - j0)
        s = s_buf[:m * n].reshape(m, n)
        kt = tile_rows(k, ka, hk, k0 + j0, n, k_buf, codec)
        vt = tile_rows(v, ka, hk, k0 + j0, n, v_buf, codec)
        pack_transposed(kt, panels, simd)
        matmul_nt(qt, kt, panels, s, simd)
        e = e_buf[:m * n].reshape(m, n) if has_extra else s
        if has_extra:
            extra_tile(extra, b, h, i0, m, j0, n, e)
        softmax_tile(s, i0, m, j0, sq_d, sk, wl, wr, softcap, slopes[b, h:h + 1], has_alibi, e, has_extra,
                     row_max, row_sum, acc)
        if drop_scale > 0:
            dropout_tile(drop, drop_scale, b, h, i0, j0, s)
        add_matmul(s, vt, acc, pv, simd)
    for r in range(m):
        if row_sum[r] > 0:
            acc[r] *= 1.0 / row_sum[r]
        encode_row(acc[r], row_of(out, qa, h, q0 + i0 + r), codec)
        set_lse(lse, qa, h, q0 + i0 + r, finish_lse(row_max[r], row_sum[r]))


@njit(**_JIT)
def _forward(q, k, v, codec, scale, wl, wr, shift, softcap, slopes, has_alibi, extra, drop, drop_scale, out, lse,
             block_q, block_k, simd):
    batch, heads_q, sq, dim = q.shape
    heads_kv, sk = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    n_tiles = (sq + block_q - 1) // block_q
    for task in prange(batch * heads_q * n_tiles):
        tile = task % n_tiles
        h = (task // n_tiles) % heads_q
        b = task // (n_tiles * heads_q)
        i0 = tile * block_q
        _query_tile(q, k, v, (b, 0), (b, 0), b, h, h // group, i0, min(block_q, sq - i0), sq, sk, codec, scale,
                    wl, wr, shift, softcap, slopes, has_alibi, extra, drop, drop_scale, out, lse, block_k, simd)


@njit(**_JIT)
def _forward_packed(q, k, v, cu_q, cu_k, tiles, codec, scale, wl, wr, softcap, slopes, has_alibi, extra, drop,
                    drop_scale, out, lse, block_q, block_k, simd):
    """Every sequence of a packed batch in one parallel loop: ``tiles`` lists ``(sequence, first row)``.

    ``q``, ``k``, ``v`` are the packed ``[total, H, D]`` arrays, read in place (a tile's rows are strided,
    and are copied once per task into its buffers); ``out`` is the packed ``[total_q, Hq, D]`` and ``lse``
    ``[Hq, total_q]``.  Long and short sequences share the cores.
    """
    heads_q = q.shape[1]
    group = heads_q // k.shape[1]
    n = tiles.shape[0]
    for task in prange(n * heads_q):
        h = task // n
        b, i0 = tiles[task - h * n, 0], tiles[task - h * n, 1]
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        _query_tile(q, k, v, (0, cu_q[b]), (0, cu_k[b]), b, h, h // group, i0, min(block_q, sq - i0), sq, sk,
                    codec, scale, wl, wr, 0, softcap, slopes, has_alibi, extra, drop, drop_scale, out, lse, block_k,
                    simd)


@njit(**_JIT)
def _delta(dout, out, codec, delta, block):
    """delta[b, h, i] = sum_d dout * out, in accumulation precision (dout/out dense ``[B, H, S, D]``, or
    packed ``[total, H, D]`` for delta ``[1, H, total]``).  A task takes a block of rows of one head
    (dense) or of every head (packed): contiguous memory either way."""
    batch, heads, sq = delta.shape
    dim = dout.shape[-1]
    n_blocks = (sq + block - 1) // block
    per_task = 1 if dout.ndim == 4 else heads
    for task in prange(batch * n_blocks * (heads // per_task)):
        i0 = (task % n_blocks) * block
        h0 = (task // n_blocks) % (heads // per_task) * per_task
        b = task // (n_blocks * (heads // per_task))
        m = min(block, sq - i0)
        dt = np.empty((m, dim), delta.dtype)
        ot = np.empty((m, dim), delta.dtype)
        for h in range(h0, h0 + per_task):
            decode_tile(dout, b, h, i0, m, dt, codec)
            decode_tile(out, b, h, i0, m, ot, codec)
            for r in range(m):
                total = dt[r, 0] * 0
                for d in range(dim):
                    total += dt[r, d] * ot[r, d]
                delta[b, h, i0 + r] = total


@njit(**_JIT)
def _backward(dout, q, k, v, lse, delta, seqs, owner_start, members, codec, scale, wl, wr, softcap, slopes,
              has_alibi, extra, dbias_sums, dbias_strides, want_dbias, drop, drop_scale, dq_part, dk, dv, block_q,
              block_k, simd):
    """dK/dV of each key tile, dq and dbias partial sums; one task per (owner, key split).

    Sequence ``s`` is ``seqs[s] = (qa, q0, ka, k0, sq, sk)``: its query rows are
    ``decode_tile(q, qa, h, q0 + i)`` (dout alike; lse, delta and dq_part at ``[qa, h, q0 + i]``) and
    its keys ``decode_tile(k, ka, hk, k0 + j)`` (v alike, see :func:`~fastattn.cpu._tiles.decode_tile`; dk/dv rows are written at
    :func:`~fastattn.cpu._tiles.row_of` ``(dk, ka, hk, k0 + j)``).  An owner
    is a list of (sequence, KV head) members, ``members[owner_start[o]:
    owner_start[o + 1]]``: one pair, or every pair whose bias gradients land on
    the same elements (a bias broadcast over batches or heads), walked in a
    fixed order.  Split ``p`` takes key tiles ``p, p + n_split, ...`` of each
    member (interleaved, so causal work spreads evenly) and adds into
    ``dq_part[p]`` and ``dbias_sums[p or 0]`` (``dbias_strides``: split, then
    the four of ``[B, Hq, Sq, Sk]``): every element has one writer.
    """
    dim = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    n_split = dq_part.shape[0]
    n_owner = owner_start.size - 1
    acc_t = lse.dtype
    for task in prange(n_owner * n_split):
        split = task % n_split
        o = task // n_split
        # every buffer made once a task (see backward_buffers)
        buffers = backward_buffers(block_q, block_k, dim, acc_t, extra[3] or extra[6])
        k_buf = np.empty((block_k, dim), acc_t)
        v_buf = np.empty((block_k, dim), acc_t)
        dk_buf = np.empty((block_k, dim), acc_t)
        dv_buf = np.empty((block_k, dim), acc_t)
        for member in range(owner_start[o], owner_start[o + 1]):
            b, hk = members[member, 0], members[member, 1]
            qa, q0, ka, k0, sq, sk = seqs[b, 0], seqs[b, 1], seqs[b, 2], seqs[b, 3], seqs[b, 4], seqs[b, 5]
            if sq == 0:  # no query: the keys' gradients stay 0
                continue
            n_tiles = (sk + block_k - 1) // block_k
            for tile in range(split, n_tiles, n_split):  # interleaved: causal work spreads evenly
                j0 = tile * block_k
                n = min(block_k, sk - j0)
                kt = tile_rows(k, ka, hk, k0 + j0, n, k_buf, codec)
                vt = tile_rows(v, ka, hk, k0 + j0, n, v_buf, codec)
                dk_acc = dk_buf[:n]
                dv_acc = dv_buf[:n]
                dk_acc[:] = 0
                dv_acc[:] = 0
                sums = dbias_sums[split if dbias_strides[0] else 0]  # not inside the call: numba refuses that
                key_tile_backward(dout, q, (qa, q0), b, hk, group, kt, vt, j0, sq, sk, wl, wr, softcap, slopes,
                                  has_alibi, extra, sums, dbias_strides[1:], want_dbias, drop, drop_scale, lse,
                                  delta, scale, codec, block_q, dk_acc, dv_acc, dq_part[split], True, buffers, simd)
                for r in range(n):
                    encode_row(dk_acc[r], row_of(dk, ka, hk, k0 + j0 + r), codec)
                    encode_row(dv_acc[r], row_of(dv, ka, hk, k0 + j0 + r), codec)


@njit(**_JIT)
def _reduce_dq(dq_part, scale, codec, dq, block):
    """``dq`` = scale x the sum of the splits' parts, in split order (dq dense ``[B, H, S, D]``, or packed
    ``[total, H, D]`` for parts ``[n_split, 1, H, total, D]``).  A task takes a block of rows of one head
    (dense) or of every head (packed dq rows are contiguous across heads)."""
    n_split, batch, heads, sq, dim = dq_part.shape
    n_blocks = (sq + block - 1) // block
    per_task = 1 if dq.ndim == 4 else heads
    for task in prange(batch * n_blocks * (heads // per_task)):
        i0 = (task % n_blocks) * block
        h0 = (task // n_blocks) % (heads // per_task) * per_task
        b = task // (n_blocks * (heads // per_task))
        row = np.empty(dim, dq_part.dtype)
        for i in range(i0, min(sq, i0 + block)):
            for h in range(h0, h0 + per_task):
                row[:] = dq_part[0, b, h, i]
                for s in range(1, n_split):
                    row += dq_part[s, b, h, i]
                row *= scale
                encode_row(row, row_of(dq, b, h, i), codec)


def _slopes(slopes, spec):
    acc = spec.accum_dtype
    if slopes is None:
        return np.zeros((spec.batch, spec.heads_q), acc), False
    return np.ascontiguousarray(np.broadcast_to(slopes, (spec.batch, spec.heads_q)), dtype=acc), True


def _strides(shape):
    """:func:`~fastattn._validate.element_strides` as the int64 array the kernels take."""
    return np.array(element_strides(shape), np.int64)


def _extra(extra, spec):
    """:func:`~fastattn.cpu._tiles.extra_tile`'s tuple: bias and mask flat, with their strides (no copy
    unless the caller's array is not C-contiguous)."""
    none = no_extra(spec.accum_dtype)
    if not extra:
        return none
    bias, bias_strides, codec = none[0], none[1], 0
    if extra.bias is not None:
        bias = np.ascontiguousarray(bits_view(extra.bias))
        bias_strides, codec = _strides(bias.shape), codec_of(extra.bias.dtype)
    mask, mask_strides = none[4], none[5]
    if extra.mask is not None:
        mask = np.ascontiguousarray(extra.mask)
        mask_strides = _strides(mask.shape)
    return (bias.reshape(-1), bias_strides, codec, extra.bias is not None, mask.reshape(-1), mask_strides,
            extra.mask is not None)


def _dbias_sums(extra, n_split, spec):
    """Zeroed sums of the bias gradient, ``[splits or 1, bias size]``, and their element strides over
    ``[split, B, Hq, Sq, Sk]``.

    Broadcast axes get stride 0; key splits share one sum unless the bias
    broadcasts over keys (then each split has its own, added in order after).
    Without a bias to differentiate, one unused element.
    """
    if not extra or extra.bias is None:
        return np.zeros((1, 1), spec.accum_dtype), np.zeros(5, np.int64)
    shape = extra.bias.shape
    per_split = shape[3] == 1 and spec.seq_k > 1
    sums = np.zeros(((n_split if per_split else 1),) + shape, spec.accum_dtype)
    return sums.reshape(sums.shape[0], -1), _strides(sums.shape)


def _inputs(*arrays):
    return [bits_view(np.ascontiguousarray(a)) for a in arrays]


def _few_rows(k, v, spec):
    """Whether a call is decode-sized for the paged decode kernel: every query head of a KV group
    stacked into one task's few rows (``Sq x group``), each KV row read once per group."""
    from . import paged

    return (spec.shift == 0 and 0 < spec.seq_q <= spec.seq_k and spec.accum_dtype == np.float32
            and spec.seq_q * spec.group <= min(paged._SMALL_M, config.cpu_block_q)
            and spec.head_dim % paged.LANES == 0 and k.flags.c_contiguous and v.flags.c_contiguous)


def _forward_as_paged(q, k, v, slopes, spec):
    """The forward of a decode-sized call through the paged decode kernel: each (batch, KV head) is a
    sequence of one block holding its ``Sk`` keys, with the group's query heads as its heads (views)."""
    from .._validate import PagedSpec
    from . import paged

    n = spec.batch * spec.heads_kv
    d = spec.head_dim
    queries = np.ascontiguousarray(q).reshape(n, spec.group, spec.seq_q, d)
    caches = [x.reshape(n, spec.seq_k, 1, d) for x in (k, v)]
    table = np.arange(n, dtype=np.int32).reshape(n, 1)
    lens = np.full(n, spec.seq_k, np.int32)
    if slopes is not None:
        slopes = np.broadcast_to(slopes, (spec.batch, spec.heads_q)).reshape(n, spec.group)
    as_paged = PagedSpec(batch=n, heads_q=spec.group, heads_kv=1, seq_q=spec.seq_q, head_dim=d, num_blocks=n,
                         block_size=spec.seq_k, dtype=spec.dtype, cache_dtype=spec.dtype, scale=spec.scale,
                         window_left=spec.window_left, window_right=spec.window_right, softcap=spec.softcap,
                         max_seq_len=spec.seq_k)
    # A paged decode tile holds every KV head of its keys; one head here, so as many more keys a tile
    # (the per-tile work the same; 0.77 instead of 0.91 of the paged time at B=4, ctx=2048, Hkv=8, float32)
    block_k = config.cpu_decode_block_k * min(spec.heads_kv, 8)
    out, lse = paged.forward(queries, *caches, table, lens, slopes, as_paged, decode_block_k=block_k)
    return out.reshape(q.shape), lse.reshape(q.shape[:3])


def forward(q, k, v, slopes, spec, extra=None, dropout=None):
    """Run the forward kernel; return (out, lse) as NumPy arrays.

    ``extra`` is the call's :class:`~fastattn._validate.Extra` (bias and mask)
    or None, ``dropout`` its ``(seed, p)`` or None.  Decode-sized calls without
    either (:func:`_few_rows`) go through the paged decode kernel, which reads
    each key and value row once for all query heads of its group.
    """
    out = np.empty(q.shape, spec.dtype)
    lse = np.empty(q.shape[:3], spec.accum_dtype)
    if out.size == 0:
        lse.fill(-np.inf)
        return out, lse
    if not extra and dropout is None and _few_rows(k, v, spec):
        return _forward_as_paged(q, k, v, slopes, spec)
    slopes, has_alibi = _slopes(slopes, spec)
    qb, kb, vb = _inputs(q, k, v)
    with single_threaded_blas():
        _forward(qb, kb, vb, spec.codec, spec.scale, spec.window_left, spec.window_right,
                 spec.shift, spec.softcap, slopes, has_alibi, _extra(extra, spec),
                 *dropout_args(dropout, np.dtype(spec.accum_dtype)), bits_view(out), lse,
                 config.cpu_block_q, config.cpu_block_k, simd_gemm())
    return out, lse


#: Tasks the backward aims for, whatever the thread count: the key splits (and so the order in
#: which dq's partial sums are added) follow the shape alone, so every thread count gives the same bits.
#: Eight keeps a 2-core machine at its old speed (16 cost 9% at B=1, H=8, causal, from the extra
#: split); a machine with more cores than B x Hkv x 8 tasks leaves some idle in the backward.
BACKWARD_TASKS = 8
#: At most this many partial dq arrays (each the size of q).
MAX_BACKWARD_SPLITS = 8


def _num_splits(spec, owners=None):
    """Key splits per task owner (one per (batch, KV head) unless given): about :data:`BACKWARD_TASKS`
    tasks, never from the thread count."""
    owners = spec.batch * spec.heads_kv if owners is None else owners
    n_tiles = -(-spec.seq_k // config.cpu_bwd_block_k)
    want = -(-BACKWARD_TASKS // max(owners, 1))
    return max(1, min(want, n_tiles, MAX_BACKWARD_SPLITS))


def _folds(extra, want_dbias, spec):
    """Whether the backward's tasks fold batches / KV heads together (their bias gradients meet)."""
    if not want_dbias or extra.bias is None:
        return False, False
    shape = extra.bias.shape
    return shape[0] == 1 and spec.batch > 1, shape[1] == 1 and spec.heads_kv > 1


def _spread(n):
    """A permutation of ``range(n)`` that places items ``0, 1, 2, ...`` far apart (van der Corput order):
    numba hands each thread one contiguous block of a parallel loop, so the heaviest tasks, listed
    first, end up in different blocks whatever the thread count."""
    def radical_inverse(i):
        x, f = 0.0, 0.5
        while i:
            x, i, f = x + f * (i & 1), i >> 1, f / 2
        return x
    return np.argsort([radical_inverse(i) for i in range(n)], kind="stable")


def owners(seqs, heads_kv, fold_b, fold_h):
    """``(owner_start, members)`` of :func:`_backward`: each (sequence, KV head) its own owner, or grouped
    over the sequences (``fold_b``) and/or the KV heads (``fold_h``), members in order.  Owners are listed
    by cost (``sq * sk``) spread out by :func:`_spread`; the order changes who runs what, never the bits."""
    groups = {}
    for b in range(seqs.shape[0]):
        for hk in range(heads_kv):
            groups.setdefault((0 if fold_b else b, 0 if fold_h else hk), []).append((b, hk))
    lists = list(groups.values())
    cost = [sum(int(seqs[b, 4]) * int(seqs[b, 5]) for b, _ in g) for g in lists]
    by_cost = sorted(range(len(lists)), key=lambda i: -cost[i])
    lists = [lists[by_cost[i]] for i in _spread(len(lists))]
    members = np.array([m for g in lists for m in g], np.int64).reshape(-1, 2)
    owner_start = np.cumsum([0] + [len(g) for g in lists]).astype(np.int64)
    return owner_start, members


def dropout_args(dropout, acc):
    """``(drop, drop_scale)`` of the kernels for ``dropout = (seed, p)`` or None (scale 0: off)."""
    from .._philox import seed_words, threshold

    if dropout is None or dropout[1] == 0:
        return no_dropout(), acc.type(0)
    seed, p = dropout
    return np.array([*seed_words(seed), threshold(p), 0], np.uint64), acc.type(1.0 / (1.0 - p))


def run_backward(dout, q, k, v, lse, seqs, slopes, spec, extra, want_dbias, dq, dk, dv, dropout=None):
    """The delta, backward and dq kernels on dense inputs (``[B, H, S, D]``, lse ``[B, H, S]``) or packed
    ones (``[total, H, D]``, lse ``[1, H, total]``) for the sequences ``seqs``; outputs likewise
    (:func:`_backward`).  ``dout`` is ``(dout, out)``.  Returns dbias (accumulation dtype, the bias's 4-d
    shape) or None."""
    acc = spec.accum_dtype
    slopes, has_alibi = _slopes(slopes, spec)
    fold_b, fold_h = _folds(extra, want_dbias, spec)
    owner_start, members = owners(seqs, spec.heads_kv, fold_b, fold_h)
    n_split = _num_splits(spec, owner_start.size - 1)
    dq_part = scratch("dq parts", (n_split,) + lse.shape + (q.shape[-1],), acc, zero=True)
    sums, dbias_strides = _dbias_sums(extra if want_dbias else None, n_split, spec)
    delta = scratch("delta", lse.shape, acc)
    with single_threaded_blas():
        _delta(dout[0], dout[1], spec.codec, delta, config.cpu_bwd_block_q)
        _backward(dout[0], q, k, v, lse, delta, seqs, owner_start, members, spec.codec, spec.scale,
                  spec.window_left, spec.window_right, spec.softcap, slopes, has_alibi, _extra(extra, spec), sums,
                  dbias_strides, want_dbias, *dropout_args(dropout, np.dtype(acc)), dq_part, dk, dv,
                  config.cpu_bwd_block_q, config.cpu_bwd_block_k, simd_gemm())
        _reduce_dq(dq_part, spec.scale, spec.codec, dq, config.cpu_bwd_block_q)
    if not want_dbias:
        return None
    dbias = sums[0].copy()
    for part in sums[1:]:  # in split order: the same bits at any thread count
        dbias += part
    return dbias.reshape(extra.bias.shape)


def backward(dout, q, k, v, out, lse, slopes, spec, extra=None, want_dbias=False, dropout=None):
    """Run the backward kernels; return (dq, dk, dv, dbias) as NumPy arrays.

    ``dbias`` (the bias gradient in the caller's bias shape, accumulation
    dtype) is None unless ``want_dbias`` and ``extra`` has a bias.  ``dropout``:
    ``(seed, p)`` of the forward, or None.
    """
    dq = np.empty(q.shape, spec.dtype)
    dk = np.zeros(k.shape, spec.dtype)
    dv = np.zeros(v.shape, spec.dtype)
    want_dbias = bool(want_dbias and extra and extra.bias is not None)
    if dq.size == 0 or dk.size == 0:
        dq.fill(0)
        return dq, dk, dv, (np.zeros(extra.bias_shape, spec.accum_dtype) if want_dbias else None)
    db, qb, kb, vb, ob = _inputs(dout, q, k, v, out)
    seqs = np.array([(b, 0, b, 0, spec.seq_q, spec.seq_k) for b in range(spec.batch)], np.int64)
    dbias = run_backward((db, ob), qb, kb, vb, np.ascontiguousarray(lse), seqs, slopes, spec, extra, want_dbias,
                         bits_view(dq), bits_view(dk), bits_view(dv), dropout)
    return dq, dk, dv, (None if dbias is None else dbias.reshape(extra.bias_shape))


def cast(x, dtype):
    """``x`` in ``dtype`` (a gradient in accumulation precision, returned in its input's dtype)."""
    return x.astype(dtype, copy=False)


@njit(**_JIT)
def _merge(outs, lses, codec, out_mult, out, lse):
    """Combine partial states: outs [N, R, D] and lses [N, R] into out [R, D] (encoded) and lse [R]."""
    n_parts, rows, dim = outs.shape
    block = 64
    for task in prange((rows + block - 1) // block):
        row = np.empty(dim, outs.dtype)
        for r in range(task * block, min(rows, (task + 1) * block)):
            top = -np.inf
            for p in range(n_parts):
                top = max(top, lses[p, r])
            row[:] = 0
            if top == -np.inf:  # no part saw a key (NaN lses fall through and stay NaN)
                lse[r] = top
            else:
                total = top * 0  # top is finite here; lses[0, r] may be -inf
                for p in range(n_parts):
                    w = np.exp(lses[p, r] - top)
                    total += w
                    if w != 0:
                        part = outs[p, r]
                        for d in range(dim):
                            row[d] += w * part[d]
                scale = out_mult / total
                for d in range(dim):
                    row[d] *= scale
                lse[r] = top + np.log(total)
            encode_row(row, out[r], codec)


def merge(outs, lses, dtype, out_mult=1.0):
    """Merge partial states ``outs [N, ..., D]``, ``lses [N, ...]`` (accumulation dtype).

    Returns ``(out, lse)`` with ``out`` in ``dtype`` times ``out_mult``.
    """
    n_parts, dim = outs.shape[0], outs.shape[-1]
    out = np.empty(outs.shape[1:], dtype)
    lse = np.empty(lses.shape[1:], lses.dtype)
    if out.size:
        _merge(np.ascontiguousarray(outs).reshape(n_parts, -1, dim),
               np.ascontiguousarray(lses).reshape(n_parts, -1), codec_of(dtype), out_mult,
               bits_view(out).reshape(-1, dim), lse.reshape(-1))
    elif lse.size:
        lse.fill(-np.inf)
    return out, lse


def merge_states(outs, lses, dtype):
    """:func:`fastattn.merge_attention_states` on NumPy arrays."""
    acc = _accum_dtype(dtype)
    return merge(np.stack(outs).astype(acc, copy=False), np.stack(lses).astype(acc, copy=False), dtype)
