"""CPU kernels of the paged attention family.

Forward: one task per (sequence, KV heads, tile of query positions, key
split).  The query heads of a KV group are stacked into one tile, so each key
and value row is read once per group.  A decode-sized task owns every KV head
of its tokens and reads each block front to back (the heads of a token are
neighbours in the cache); prefill tasks own one KV head.  Prefill keys and
values are gathered through the block table into contiguous tiles, decoded
(f16 and fp8 through the CPU's half-precision converter, bf16 by a shift), and
multiplied through BLAS, with the shared online-softmax tile step in between.
Decode tasks (``_decode``) gather nothing: register-blocked SIMD loops
(:mod:`fastattn.cpu._decode`) read the cache rows directly, and prefetch each
tile's values and the next tile's keys while they compute.  Splits of a long
sequence's keys ("flash decoding") keep every core busy when there are few
sequences; their partial states are combined by the merge kernel of
:func:`fastattn.merge_attention_states`.  fp8 scales cost nothing: ``k_scale``
is folded into the query, ``v_scale`` into the output.

Backward: dq per (sequence, KV head, query tile), like the forward; dk/dv per
(physical block, KV head) over the inverted block table, so a block shared by
several sequences is summed by exactly one task in a fixed order (no races,
the same bits every run).

Cache writes: one task per token, fp8 stored as round-to-nearest-even
``saturate(x / scale)``.
"""
import numpy as np
from numba import get_num_threads, njit, prange

from .._config import config
from .._dtypes import E4M3, bits_view, codec_of
from .._tile import finish_lse, key_range
from ._blas import single_threaded_blas
from ._gemm import add_matmul, matmul_nt, pack_transposed, simd_gemm, takes_micro
from ._decode import add_values, scores
from ._fastmath import FASTMATH, decode_rows, decode_token, encode_row
from ._simd import E4M3_SCALE, LANES, simd_view
from ._tiles import backward_buffers, grad_tile, key_tile_backward, softmax_tile
from .rotary import plan as rotary_plan, rotate_row
from .attention import _delta, _slopes, merge

_JIT = dict(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)
_SMALL_M = 16  # tiles with at most this many rows skip BLAS (its call overhead dominates)


@njit(fastmath=FASTMATH, cache=True)
def _gather(k_rows, v_rows, table_row, hk0, heads_kv, bs, j0, n, kt, vt, codec):
    """Decode keys and values j0 .. j0+n of KV heads hk0 .. hk0+h of one sequence into kt, vt [:h, :n].

    ``k_rows``/``v_rows`` are the caches seen as ``[num_blocks * block_size * Hkv, D]``.
    The heads of a token are neighbours in memory, so a task that owns several
    KV heads streams through each block instead of striding over it; keys and
    values are read side by side (two streams keep more reads in flight than
    one).  ``kt``/``vt`` are whole C-contiguous buffers (a slice of them would
    hide the unit stride).
    """
    for c in range(n):
        t = j0 + c
        r0 = (table_row[t // bs] * bs + t % bs) * heads_kv + hk0
        decode_token(k_rows, r0, kt, c, codec)
        decode_token(v_rows, r0, vt, c, codec)


@njit(fastmath=FASTMATH, cache=True)
def _accumulate(p, vt, acc, scratch, simd):
    """acc += p @ vt: the tile product (:mod:`._gemm`) where it runs on the micro-kernels or the tile is
    tall; else, for the few rows of a decode step, loops that take four keys per pass over a row of acc
    (BLAS's call overhead dominates there).  ``scratch`` is shaped like ``acc``."""
    if takes_micro(simd, p, vt, acc) or p.shape[0] > _SMALL_M:
        add_matmul(p, vt, acc, scratch, simd)
        return
    n = vt.shape[0]
    c = 0
    while c + 4 <= n:
        v0, v1, v2, v3 = vt[c], vt[c + 1], vt[c + 2], vt[c + 3]
        for r in range(p.shape[0]):
            w0, w1, w2, w3 = p[r, c], p[r, c + 1], p[r, c + 2], p[r, c + 3]
            row = acc[r]
            for d in range(row.size):
                row[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d]
        c += 4
    for c in range(c, n):
        v0 = vt[c]
        for r in range(p.shape[0]):
            w0 = p[r, c]
            row = acc[r]
            for d in range(row.size):
                row[d] += w0 * v0[d]


@njit(fastmath=FASTMATH, cache=True)
def _group_rows(src, b, hk, group, i0, mq, dst, codec):
    """Stack rows i0 .. i0+mq of the query heads of KV head hk: dst[g * mq + r] = src[b, hk*group+g, i0+r]."""
    for g in range(group):
        decode_rows(src[b, hk * group + g, i0:i0 + mq], dst[g * mq:(g + 1) * mq], codec)


@njit(**_JIT)
def _forward(q, k_rows, v_rows, table, lens, bs, heads_kv, kv_per_task, q_codec, kv_codec, q_mult, k_mult,
             v_mult, wl, wr, softcap, slopes, has_alibi, out_part, lse_part, rows_q, block_k, simd):
    batch, heads_q, sq, dim = q.shape
    group = heads_q // heads_kv
    n_split = out_part.shape[0]
    n_tiles = (sq + rows_q - 1) // rows_q
    n_chunks = (heads_kv + kv_per_task - 1) // kv_per_task
    acc_t = lse_part.dtype
    for task in prange(batch * n_chunks * n_tiles * n_split):
        split = task % n_split
        tile = (task // n_split) % n_tiles
        hk0 = (task // (n_split * n_tiles)) % n_chunks * kv_per_task
        b = task // (n_split * n_tiles * n_chunks)
        nk = min(kv_per_task, heads_kv - hk0)
        sk = lens[b]
        i0 = tile * rows_q
        mq = min(rows_q, sq - i0)
        m = group * mq
        acc = np.zeros((nk, m, dim), acc_t)
        row_max = np.full((nk, m), -np.inf, acc_t)
        row_sum = np.zeros((nk, m), acc_t)
        chunk = (sk + n_split - 1) // n_split
        j_lo = max(key_range(i0, sq, sk, wl, wr)[0], split * chunk)
        j_hi = min(key_range(i0 + mq - 1, sq, sk, wl, wr)[1], (split + 1) * chunk)
        if j_lo < j_hi:
            qt = np.empty((nk, m, dim), acc_t)
            for u in range(nk):
                _group_rows(q, b, hk0 + u, group, i0, mq, qt[u], q_codec)
                qt[u] *= q_mult * k_mult[hk0 + u]
            kt = np.empty((nk, block_k, dim), acc_t)
            vt = np.empty((nk, block_k, dim), acc_t)
            s_buf = np.empty(m * block_k, acc_t)
            panels = np.empty(block_k * dim, acc_t)
            scratch = np.empty((m, dim), acc_t)
            for j0 in range(j_lo, j_hi, block_k):
                n = min(block_k, j_hi - j0)
                _gather(k_rows, v_rows, table[b], hk0, heads_kv, bs, j0, n, kt, vt, kv_codec)
                s = s_buf[:m * n].reshape(m, n)
                for u in range(nk):
                    hk = hk0 + u
                    pack_transposed(kt[u, :n], panels, simd)
                    matmul_nt(qt[u], kt[u, :n], panels, s, simd)
                    softmax_tile(s, i0, mq, j0, sq, sk, wl, wr, softcap, slopes[b, hk * group:(hk + 1) * group],
                                 has_alibi, s, False, row_max[u], row_sum[u], acc[u])
                    _accumulate(s, vt[u, :n], acc[u], scratch, simd)
        for u in range(nk):
            hk = hk0 + u
            for r in range(m):
                h = hk * group + r // mq
                i = i0 + r % mq
                inv = v_mult[hk] / row_sum[u, r] if row_sum[u, r] > 0 else 0.0
                for d in range(dim):
                    out_part[split, b, h, i, d] = acc[u, r, d] * inv
                lse_part[split, b, h, i] = finish_lse(row_max[u, r], row_sum[u, r])


@njit(fastmath=FASTMATH, cache=True)
def _tile_starts(table_row, bs, row_len, j0, n, starts):
    """starts[i] = where the row of key j0 + i (``row_len`` elements: every KV head) starts in the cache."""
    block, row = j0 // bs, j0 % bs
    for i in range(n):
        starts[i] = (table_row[block] * bs + row) * row_len
        row += 1
        if row == bs:
            block += 1
            row = 0


@njit(**_JIT)
def _decode(q, k_flat, v_flat, table, lens, bs, heads_kv, q_codec, q_mult, k_mult, v_mult, wl, wr, softcap,
            slopes, has_alibi, out_part, lse_part, block_k):
    """The forward for decode-sized queries (a float32 accumulator, D a multiple of ``LANES``).

    One task per (sequence, key split) owns every KV head.  Keys and values are
    read straight from the cache rows by the register-blocked loops of
    :mod:`fastattn.cpu._decode`; nothing is gathered.
    """
    batch, heads_q, sq, dim = q.shape
    group = heads_q // heads_kv
    m = group * sq
    n_split = out_part.shape[0]
    for task in prange(batch * n_split):
        split = task % n_split
        b = task // n_split
        sk = lens[b]
        acc = np.zeros((heads_kv, m, dim), np.float32)
        row_max = np.full((heads_kv, m), -np.inf, np.float32)
        row_sum = np.zeros((heads_kv, m), np.float32)
        chunk = (sk + n_split - 1) // n_split
        j_lo = max(key_range(0, sq, sk, wl, wr)[0], split * chunk)
        j_hi = min(key_range(sq - 1, sq, sk, wl, wr)[1], (split + 1) * chunk)
        if j_lo < j_hi:
            qt = np.empty((heads_kv, m, dim), np.float32)
            for u in range(heads_kv):
                _group_rows(q, b, u, group, 0, sq, qt[u], q_codec)
                qt[u] *= q_mult * k_mult[u]
            row_len = heads_kv * dim
            starts = np.empty(block_k, np.int64)  # where each key's row (all KV heads) starts
            next_starts = np.empty(block_k, np.int64)
            _tile_starts(table[b], bs, row_len, j_lo, min(block_k, j_hi - j_lo), starts)
            for j0 in range(j_lo, j_hi, block_k):
                n = min(block_k, j_hi - j0)
                s = np.empty((heads_kv, m, n), np.float32)  # C-contiguous rows: the softmax vectorises
                scores(qt, k_flat, starts, n, s, v_flat)
                next_n = min(block_k, j_hi - j0 - n)
                _tile_starts(table[b], bs, row_len, j0 + n, next_n, next_starts)
                cursor = (0, 0)  # the next tile's keys, asked for front to back over the heads' passes
                rows = heads_kv * m  # every head's rows in one call: q head = row // sq
                softmax_tile(s.reshape(rows, n), 0, sq, j0, sq, sk, wl, wr, softcap, slopes[b], has_alibi,
                             s.reshape(rows, n), False, row_max.reshape(rows), row_sum.reshape(rows),
                             acc.reshape(rows, dim))
                for u in range(heads_kv):
                    cursor = add_values(acc[u], s[u], v_flat, starts, u, n, k_flat, next_starts, next_n, heads_kv,
                                        cursor)
                starts, next_starts = next_starts, starts
        for u in range(heads_kv):
            for r in range(m):
                h = u * group + r // sq
                inv = v_mult[u] / row_sum[u, r] if row_sum[u, r] > 0 else 0.0
                for d in range(dim):
                    out_part[split, b, h, r % sq, d] = acc[u, r, d] * inv
                lse_part[split, b, h, r % sq] = finish_lse(row_max[u, r], row_sum[u, r])


@njit(**_JIT)
def _backward_dq(dout, q, k_rows, v_rows, table, lens, bs, heads_kv, lse, delta, codec, scale, wl, wr, softcap,
                 slopes, has_alibi, dq, rows_q, block_k, simd):
    batch, heads_q, sq, dim = q.shape
    group = heads_q // heads_kv
    n_tiles = (sq + rows_q - 1) // rows_q
    acc_t = lse.dtype
    for task in prange(batch * heads_kv * n_tiles):
        tile = task % n_tiles
        hk = (task // n_tiles) % heads_kv
        b = task // (n_tiles * heads_kv)
        sk = lens[b]
        i0 = tile * rows_q
        mq = min(rows_q, sq - i0)
        m = group * mq
        qt = np.empty((m, dim), acc_t)
        dt = np.empty((m, dim), acc_t)
        lse_t = np.empty(m, acc_t)
        delta_t = np.empty(m, acc_t)
        _group_rows(q, b, hk, group, i0, mq, qt, codec)
        _group_rows(dout, b, hk, group, i0, mq, dt, codec)
        for r in range(m):
            lse_t[r] = lse[b, hk * group + r // mq, i0 + r % mq]
            delta_t[r] = delta[b, hk * group + r // mq, i0 + r % mq]
        qt *= scale
        dq_acc = np.zeros((m, dim), acc_t)
        j_lo = key_range(i0, sq, sk, wl, wr)[0]
        j_hi = key_range(i0 + mq - 1, sq, sk, wl, wr)[1]
        kt = np.empty((1, block_k, dim), acc_t)
        vt = np.empty((1, block_k, dim), acc_t)
        s_buf, dp_buf = np.empty(m * block_k, acc_t), np.empty(m * block_k, acc_t)
        k_panels, v_panels = np.empty(block_k * dim, acc_t), np.empty(block_k * dim, acc_t)
        scratch = np.empty((m, dim), acc_t)
        for j0 in range(j_lo, j_hi, block_k):
            n = min(block_k, j_hi - j0)
            _gather(k_rows, v_rows, table[b], hk, heads_kv, bs, j0, n, kt, vt, codec)
            s = s_buf[:m * n].reshape(m, n)
            dp = dp_buf[:m * n].reshape(m, n)
            pack_transposed(kt[0, :n], k_panels, simd)
            pack_transposed(vt[0, :n], v_panels, simd)
            matmul_nt(qt, kt[0, :n], k_panels, s, simd)
            matmul_nt(dt, vt[0, :n], v_panels, dp, simd)
            grad_tile(s, dp, i0, mq, j0, sq, sk, wl, wr, softcap, slopes[b, hk * group:(hk + 1) * group],
                      has_alibi, s, False, lse_t, delta_t)
            add_matmul(dp, kt[0, :n], dq_acc, scratch, simd)
        for r in range(m):
            dq_acc[r] *= scale
            encode_row(dq_acc[r], dq[b, hk * group + r // mq, i0 + r % mq], codec)


@njit(**_JIT)
def _backward_dkdv(dout, q, k_cache, v_cache, lens, lse, delta, ref_start, ref_seq, ref_block, codec,
                   scale, wl, wr, softcap, slopes, has_alibi, dk_cache, dv_cache, block_q, simd):
    """One task per (physical block, KV head): sum the contributions of every sequence reading it."""
    batch, heads_q, sq, dim = q.shape
    bs, heads_kv = k_cache.shape[1], k_cache.shape[2]
    group = heads_q // heads_kv
    n_used = ref_start.size - 1
    acc_t = lse.dtype
    no_dq = np.zeros((1, 1, 1, 1), acc_t)
    none = np.zeros(4, np.int64)
    no_drop, zero = np.zeros(4, np.uint64), lse.dtype.type(0)
    no_extra = (np.zeros(1, acc_t), none, 0, False, np.ones(1, np.bool_), none, False)
    for task in prange(n_used * heads_kv):
        hk = task % heads_kv
        u = task // heads_kv
        blk = ref_block[u]
        buffers = backward_buffers(min(block_q, sq), bs, dim, acc_t, False)
        dk_acc = np.zeros((bs, dim), acc_t)
        dv_acc = np.zeros((bs, dim), acc_t)
        for ref in range(ref_start[u], ref_start[u + 1]):
            b = ref_seq[ref, 0]
            j0 = ref_seq[ref, 1] * bs
            sk = lens[b]
            n = min(bs, sk - j0)
            kt = np.empty((n, dim), acc_t)
            vt = np.empty((n, dim), acc_t)
            decode_rows(k_cache[blk, :n, hk], kt, codec)
            decode_rows(v_cache[blk, :n, hk], vt, codec)
            key_tile_backward(dout, q, (b, 0), b, hk, group, kt, vt, j0, sq, sk, wl, wr, softcap, slopes, has_alibi,
                              no_extra, no_extra[0], none, False, no_drop, zero, lse, delta, scale, codec, block_q,
                              dk_acc[:n], dv_acc[:n], no_dq, False, buffers, simd)
        for r in range(bs):
            encode_row(dk_acc[r], dk_cache[blk, r, hk], codec)
            encode_row(dv_acc[r], dv_cache[blk, r, hk], codec)


@njit(fastmath=FASTMATH, cache=True)
def _store_token(src, scale, dst, buf, in_codec, cache_codec, cos, sin, position, rotated, interleaved):
    """dst [Hkv, D] (one cache row) = encode(decode(src [Hkv, D]) / scale[h]); with ``rotated``, each
    head's row turned by the rotary tables at ``position`` first."""
    decode_rows(src, buf, in_codec)
    for h in range(buf.shape[0]):
        inv_row = buf[h]
        if rotated:
            rotate_row(inv_row, cos[position], sin[position], interleaved, cos.dtype.type(1))
        for d in range(inv_row.size):
            inv_row[d] = inv_row[d] / scale[h]
        encode_row(inv_row, dst[h], cache_codec)


@njit(**_JIT)
def _write(k, v, k_cache, v_cache, slots, in_codec, cache_codec, k_scale, v_scale, cos, sin, positions, rotated,
           interleaved):
    tokens, heads, dim = k.shape
    bs = k_cache.shape[1]
    for t in prange(tokens):
        slot = slots[t]
        if slot >= 0:
            buf = np.empty((heads, dim), k_scale.dtype)
            p = positions[0, t] if rotated else 0
            _store_token(k[t], k_scale, k_cache[slot // bs, slot % bs], buf, in_codec, cache_codec, cos, sin, p,
                         rotated, interleaved)
            _store_token(v[t], v_scale, v_cache[slot // bs, slot % bs], buf, in_codec, cache_codec, cos, sin, p,
                         False, interleaved)


@njit(**_JIT)
def _copy(k, v, k_cache, v_cache, slots):
    """Same dtype, no scale: the rows' bits as they are."""
    bs = k_cache.shape[1]
    for t in prange(k.shape[0]):
        slot = slots[t]
        if slot >= 0:
            k_cache[slot // bs, slot % bs] = k[t]
            v_cache[slot // bs, slot % bs] = v[t]


# --- host side ---------------------------------------------------------------------

def _token_rows(k_cache, v_cache):
    """The caches as [num_blocks * block_size * Hkv, D] bit arrays: one contiguous row per token and head."""
    return [bits_view(np.ascontiguousarray(c)).reshape(-1, c.shape[-1]) for c in (k_cache, v_cache)]


def _rows_per_task(spec):
    """Query positions per task: about ``config.cpu_block_q`` stacked rows of the KV group."""
    return max(1, min(spec.seq_q, config.cpu_block_q // spec.group))


def kv_heads_per_task(spec, rows_q):
    """All KV heads in one task for decode-sized query tiles (streaming through the blocks), else one.

    Decode is memory-bound: a task that owns every head of a token reads each
    block front to back.  Prefill is compute-bound, with enough query rows per
    head to fill the cores without that.
    """
    return spec.heads_kv if spec.group * rows_q <= _SMALL_M else 1


def num_splits(spec, rows_q):
    """Key splits per task so that there are a few tasks per core (1 when there are enough)."""
    tasks = spec.batch * -(-spec.heads_kv // kv_heads_per_task(spec, rows_q)) * -(-spec.seq_q // rows_q)
    want = -(-4 * get_num_threads() // max(tasks, 1))
    by_length = -(-spec.max_seq_len // config.cpu_split_min_keys)
    return max(1, min(want, by_length))


def _fits_decode(spec, rows_q, per_task):
    """Whether the register-blocked decode kernel takes this call: decode-sized query tiles that own
    every KV head, a float32 accumulator and a head dimension its vector passes divide."""
    return (per_task == spec.heads_kv and rows_q == spec.seq_q and spec.accum_dtype == np.float32
            and spec.head_dim % LANES == 0)


def forward(q, k_cache, v_cache, table, lens, slopes, spec, q_scale=1.0, k_scale=None, v_scale=None,
            out_dtype=None, out_scale=1.0, decode_block_k=None):
    """Run the paged forward kernel and merge its splits; return (out, lse) as NumPy arrays.

    ``decode_block_k`` (default ``config.cpu_decode_block_k``) is the decode kernel's keys per tile.
    """
    acc = spec.accum_dtype
    ones = np.ones(spec.heads_kv, acc)
    k_mult = ones if k_scale is None else k_scale.astype(acc)
    v_mult = ones if v_scale is None else v_scale.astype(acc)
    slopes, has_alibi = _slopes(slopes, spec)
    rows_q = _rows_per_task(spec)
    n_split = num_splits(spec, rows_q)
    per_task = kv_heads_per_task(spec, rows_q)
    out_part = np.empty((n_split,) + q.shape, acc)
    lse_part = np.empty((n_split,) + q.shape[:3], acc)
    if q.size and _fits_decode(spec, rows_q, per_task):
        k_flat, v_flat = (simd_view(np.ascontiguousarray(c)).reshape(-1) for c in (k_cache, v_cache))
        if codec_of(k_cache.dtype) == E4M3:  # the loads give e4m3 values times 2**-8
            k_mult, v_mult = k_mult * E4M3_SCALE, v_mult * E4M3_SCALE
        _decode(bits_view(np.ascontiguousarray(q)), k_flat, v_flat, table, lens, spec.block_size, spec.heads_kv,
                codec_of(q.dtype), spec.scale * q_scale, k_mult, v_mult, spec.window_left, spec.window_right,
                spec.softcap, slopes, has_alibi, out_part, lse_part,
                max(1, decode_block_k or config.cpu_decode_block_k))
    elif q.size:
        with single_threaded_blas():
            _forward(bits_view(np.ascontiguousarray(q)), *_token_rows(k_cache, v_cache), table, lens,
                     spec.block_size, spec.heads_kv, per_task, codec_of(q.dtype), codec_of(k_cache.dtype),
                     spec.scale * q_scale, k_mult, v_mult, spec.window_left, spec.window_right, spec.softcap,
                     slopes, has_alibi, out_part, lse_part, rows_q, max(1, config.cpu_paged_block_k // per_task),
                     simd_gemm())
    return merge(out_part, lse_part, spec.dtype if out_dtype is None else out_dtype, 1.0 / out_scale)


def _inverted_table(table, lens, block_size):
    """For each physical block read by some sequence: the (sequence, logical block) pairs reading it.

    Returns CSR arrays ``(start [U+1], refs [R, 2], blocks [U])`` sorted by block,
    then sequence, then logical block: the fixed order of the backward sums.
    """
    used = -(-lens.astype(np.int64) // block_size)
    seq, logical = np.nonzero(np.arange(table.shape[1])[None, :] < used[:, None])
    physical = table[seq, logical].astype(np.int64)
    order = np.lexsort((logical, seq, physical))
    physical, refs = physical[order], np.stack([seq[order], logical[order]], axis=1)
    blocks, counts = np.unique(physical, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)])
    return start.astype(np.int64), np.ascontiguousarray(refs, dtype=np.int64), blocks.astype(np.int64)


def backward(dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec):
    """Run the paged backward kernels; return (dq, dk_cache, dv_cache) as NumPy arrays."""
    dq = np.zeros(q.shape, spec.dtype)
    dk_cache = np.zeros(k_cache.shape, spec.dtype)
    dv_cache = np.zeros(v_cache.shape, spec.dtype)
    if q.size == 0 or spec.max_seq_len == 0:
        return dq, dk_cache, dv_cache
    codec = codec_of(spec.dtype)
    db, qb, ob = (bits_view(np.ascontiguousarray(x)) for x in (dout, q, out))
    kb, vb = bits_view(k_cache), bits_view(v_cache)
    lse = np.ascontiguousarray(lse)
    delta = np.empty(q.shape[:3], spec.accum_dtype)
    start, refs, blocks = _inverted_table(table, lens, spec.block_size)
    slopes, has_alibi = _slopes(slopes, spec)
    options = (codec, spec.scale, spec.window_left, spec.window_right, spec.softcap, slopes, has_alibi)
    with single_threaded_blas():
        _delta(db, ob, codec, delta, config.cpu_bwd_block_q)
        _backward_dq(db, qb, *_token_rows(k_cache, v_cache), table, lens, spec.block_size, spec.heads_kv, lse,
                     delta, *options, bits_view(dq), _rows_per_task(spec), config.cpu_paged_block_k, simd_gemm())
        _backward_dkdv(db, qb, kb, vb, lens, lse, delta, start, refs, blocks, *options,
                       bits_view(dk_cache), bits_view(dv_cache), config.cpu_bwd_block_q, simd_gemm())
    return dq, dk_cache, dv_cache


def write(k, v, k_cache, v_cache, slots, k_scale, v_scale, rotary=None):
    """Write k, v [T, Hkv, D] into the caches at ``slots`` (negative: skipped), in place; ``rotary`` (a
    :class:`~fastattn._validate.RotaryPlan` with positions ``[1, T]``) turns the keys on the way."""
    if k.shape[0] == 0:
        return
    if rotary is None and k.dtype == k_cache.dtype and not (k_scale != 1).any() and not (v_scale != 1).any():
        _copy(*(bits_view(np.ascontiguousarray(x)) for x in (k, v)), bits_view(k_cache), bits_view(v_cache), slots)
        return
    acc = np.float64 if k.dtype == np.float64 and k_cache.dtype == np.float64 else np.float32
    cos, sin, positions, interleaved = rotary_plan(rotary, np.dtype(acc))
    _write(bits_view(np.ascontiguousarray(k)), bits_view(np.ascontiguousarray(v)), bits_view(k_cache),
           bits_view(v_cache), slots, codec_of(k.dtype), codec_of(k_cache.dtype),
           k_scale.astype(acc), v_scale.astype(acc), cos, sin, positions, rotary is not None, interleaved)
