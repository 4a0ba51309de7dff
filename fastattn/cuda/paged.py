"""CUDA kernels of the paged attention family (numba.cuda).

The twin of :mod:`fastattn.cpu.paged`.  Kernels are compiled per input and
cache dtype and per head-dimension bucket (:data:`fastattn.cuda._tiles.HEAD_DIMS`);
arithmetic is float32 (float64 for float64 inputs), fp8 caches are decoded
from their bits (:mod:`fastattn.cuda._device`).

Forward (decode and chunked prefill): one thread block per (tile of stacked
query rows, sequence, KV head, key split), flattened into a one-dimensional
grid.  The query heads of a KV group are stacked into the block's rows
(FlashDecoding with GQA), so each key and value row is read from the cache
once per group.  Keys, then values, pass through one shared tile, read from
the cache with 16-byte vector loads where the rows allow it; the threads share
the work of a tile: scores (one (row, key) pair each), the online softmax (one
row each) and the output rows, which stay in shared memory (each thread owns
one row's every ``threads / rows``-th feature).  Index division is 32-bit
(:func:`fastattn.cuda._device.udiv`), so the kernel fits 64 registers and
runs at 50% occupancy.  Long sequences are split over several blocks and the
partial states merged on the GPU by :func:`fastattn.cuda.attention.merge`.

Backward (FlashAttention-2 style): one block per (tile of keys, sequence, KV
head) accumulates dk/dv for its keys in shared memory and adds dq with
``cuda.atomic.add``; the key gradients go to the physical cache rows with
``cuda.atomic.add`` too, so blocks shared by several sequences get the sum of
their contributions.  The float32 (float64) sums are zeroed and converted to
the cache dtype on the device.

Cache writes: one thread per element, fp8 stored as round-to-nearest-even
``saturate(x / scale)``.
"""
import math

import numpy as np
from numba import cuda, float32, int64, uint64

from .._config import config
from . import _device, _launch, _mma, _tensor_core
from ._device import acc_type, element_type, tile_math, udiv, umod
from ._tiles import HEAD_DIMS
from .attention import _check_head_dim, merge, slopes_args

_kernels = {}
_SHARED_BYTES = 48 * 1024  # static shared memory per block
#: Static shared memory of a decode block: eight blocks an SM on sm_80 (164 KiB, 1 KiB each reserved).
DECODE_SHARED_BYTES = 164 * 1024 // 8 - 1024
#: Decode blocks resident per SM that ptxas must allow: 8 x 128 threads (50%; registers <= 64).
DECODE_MIN_BLOCKS = 8


def _fit(itemsize, db, rows, row_arrays, tile_arrays, score_arrays, limit):
    """(rows, keys) per block: the configured key tile halved until the shared arrays fit in ``limit``."""
    tile = config.cuda_paged_block_k

    def size(r, t):
        values = (row_arrays * r + tile_arrays * t) * (db + 1) + score_arrays * r * (t + 1) + 4 * r
        return values * itemsize + (4 * r + t) * 8  # and the int64 row and token indices

    while size(rows, tile) > limit and tile > 1:
        tile //= 2
    return rows, tile


def _shape(name, acc, db, want=None):
    """(rows, keys) of a kernel.  The decode kernel keeps its query and output rows in shared memory
    and fits :data:`DECODE_SHARED_BYTES` up to D = 128 (float64 stacks half the rows: its values are
    twice as wide); larger head dimensions and the backward take up to the 48 KiB a block may have.
    ``want`` caps the forward's rows (:func:`decode_rows`)."""
    itemsize = 8 if acc.bitwidth == 64 else 4
    rows = config.cuda_paged_rows
    if name == "forward":
        if itemsize == 8:
            rows = max(1, rows // 2)
        rows = min(rows, want) if want else rows
        return _fit(itemsize, db, rows, 2, 1, 1, DECODE_SHARED_BYTES if db <= 128 else _SHARED_BYTES)
    return _fit(itemsize, db, rows, 2, 4, 2, _SHARED_BYTES)


def decode_rows(spec):
    """Stacked rows a forward block needs: ``Sq x group`` rounded up to a power of two.  A decode
    with 4 query heads a KV head stacks 4 rows, not the configured 8: no thread of the score and
    output loops then waits on a row that holds no query (the first GPU profile, an H200, showed
    half of them idle)."""
    need = max(1, spec.seq_q * (spec.heads_q // spec.heads_kv))
    return 1 << (need - 1).bit_length()


def _compiled(name, dtypes, db, want=None):
    key = (name, dtypes, db, want, config.cuda_paged_rows, config.cuda_paged_block_k, config.cuda_paged_threads)
    if key not in _kernels:
        rows, tile = _shape(name, acc_type(dtypes[0]), db, want)
        _kernels[key] = (_device.kernel(_MAKERS[name](*dtypes, db, rows, tile, config.cuda_paged_threads),
                                        launch_bounds(name)), rows, tile)
    return _kernels[key]


def launch_bounds(name):
    """``(threads, min_blocks)`` of the forward (decode) kernel, else None."""
    return (config.cuda_paged_threads, DECODE_MIN_BLOCKS) if name == "forward" else None


def _make_forward(q_dtype, cache_dtype, db, rows, tile, threads):
    q_load = _device.codec(q_dtype)[0]
    kv_load = _device.codec(cache_dtype)[0]
    acc = acc_type(q_dtype)
    t = tile_math(acc)
    key_range, softcap_score, alibi_bias = t.key_range, t.softcap_score, t.alibi_bias
    online_rescale, finish_lse = t.online_rescale, t.finish_lse
    lanes = threads // rows  # threads per stacked row in the output update
    zero, one, neg_inf = acc(0.0), acc(1.0), acc(-math.inf)
    db1, tile1 = db + 1, tile + 1

    width = _device.vector_width(np.dtype(cache_dtype).itemsize)
    per_row = db // width  # vectors in a row of the bucket

    @_device.inline
    def stage(cache, token_rows, n, dim, vector, dst):
        """The cache rows ``token_rows[:n]`` into ``dst`` (zero past ``n`` or ``dim``): 16-byte
        vector loads when ``vector`` (rows 16-byte aligned, ``dim`` a multiple of the width)."""
        if vector:
            e = cuda.threadIdx.x
            while e < tile * per_row:  # a while loop: no trip-count division
                c = udiv(e, per_row)
                d0 = (e - c * per_row) * width
                if c < n and d0 < dim:
                    xs = _device.load16(cache, uint64(token_rows[c]), uint64(d0))
                    for k in range(width):
                        dst[c, d0 + k] = kv_load(xs[k])
                else:
                    for k in range(width):
                        dst[c, d0 + k] = zero
                e += cuda.blockDim.x
        else:
            for e in range(cuda.threadIdx.x, tile * db, cuda.blockDim.x):
                c = udiv(e, db)
                d = e - c * db
                x = zero
                if c < n and d < dim:
                    x = kv_load(cache[uint64(token_rows[c]), uint64(d)])
                dst[c, d] = x

    def forward(q, k_cache, v_cache, table, lens, batch, heads_q, heads_kv, sq, dim, block_size, q_mult,
                k_scale, v_scale, has_scales, wl, wr, softcap, slopes, slope_stride, has_alibi, n_split,
                vector, out_part, lse_part):
        group = udiv(heads_q, heads_kv)
        per_block = min(group, rows)
        mq = max(1, rows // per_block)
        n_chunks = udiv(group + per_block - 1, per_block)
        split = umod(cuda.blockIdx.x, n_split)
        rest = udiv(cuda.blockIdx.x, n_split)
        bh = umod(rest, batch * heads_kv)
        xb = udiv(rest, batch * heads_kv)
        b = udiv(bh, heads_kv)
        hk = bh - b * heads_kv
        g0 = umod(xb, n_chunks) * per_block
        i0 = udiv(xb, n_chunks) * mq
        n_h = min(per_block, group - g0)
        m_q = min(mq, sq - i0)
        m = n_h * m_q
        h0 = hk * group + g0
        tid = cuda.threadIdx.x
        row = udiv(tid, lanes)  # this thread's stacked row in the output update
        lane = tid - row * lanes
        qs = cuda.shared.array((rows, db1), acc)
        kv = cuda.shared.array((tile, db1), acc)
        s = cuda.shared.array((rows, tile1), acc)
        row_max = cuda.shared.array(rows, acc)
        row_sum = cuda.shared.array(rows, acc)
        alpha = cuda.shared.array(rows, acc)
        token_rows = cuda.shared.array(tile, int64)
        row_i = cuda.shared.array(rows, int64)
        row_lo = cuda.shared.array(rows, int64)
        row_hi = cuda.shared.array(rows, int64)
        row_out = cuda.shared.array(rows, int64)
        row_slope = cuda.shared.array(rows, acc)
        o = cuda.shared.array((rows, db1), acc)  # the output rows, in shared memory: registers stay few
        k_mult = k_scale[hk] if has_scales else one
        v_mult = v_scale[hk] if has_scales else one
        for e in range(tid, rows * db, cuda.blockDim.x):
            r = udiv(e, db)
            d = e - r * db
            x = zero
            if r < m and d < dim:
                x = q_load(q[uint64(((b * heads_q + h0 + udiv(r, m_q)) * sq) + i0 + umod(r, m_q)), uint64(d)]) * q_mult * k_mult
            qs[r, d] = x
        sk = lens[b]
        for r in range(tid, rows, cuda.blockDim.x):  # per stacked row: its query, visible keys, slope, output row
            row_max[r] = neg_inf
            row_sum[r] = zero
            i = i0 + umod(r, m_q)
            h = h0 + udiv(r, m_q)
            row_i[r] = i
            row_lo[r], row_hi[r] = key_range(i, sq, sk, wl, wr)
            if r >= m:
                row_hi[r] = row_lo[r]
            row_slope[r] = slopes[b * slope_stride + h] if has_alibi else zero
            row_out[r] = (b * heads_q + h) * sq + i
        for e in range(tid, rows * db, cuda.blockDim.x):
            r = udiv(e, db)
            o[r, e - r * db] = zero
        chunk = udiv(sk + n_split - 1, n_split)
        j_lo = max(key_range(i0, sq, sk, wl, wr)[0], split * chunk)
        j_hi = min(key_range(i0 + m_q - 1, sq, sk, wl, wr)[1], (split + 1) * chunk)
        for j0 in range(j_lo, j_hi, tile):
            n = min(tile, j_hi - j0)
            cuda.syncthreads()
            for c in range(tid, n, cuda.blockDim.x):
                tok = j0 + c
                token_rows[c] = (table[b, udiv(tok, block_size)] * block_size + umod(tok, block_size)) * heads_kv + hk
            cuda.syncthreads()
            stage(k_cache, token_rows, n, dim, vector, kv)
            cuda.syncthreads()
            for e in range(tid, rows * tile, cuda.blockDim.x):
                r = udiv(e, tile)
                c = e - r * tile
                j = j0 + c
                x = neg_inf
                if c < n and row_lo[r] <= j and j < row_hi[r]:
                    x = zero
                    for d in range(0, dim, cuda.blockDim.z):
                        x += qs[r, d] * kv[c, d]
                    x = softcap_score(x, softcap)
                    if has_alibi:
                        x += alibi_bias(row_slope[r], row_i[r], j, sq, sk)
                s[r, c] = x
            cuda.syncthreads()
            for r in range(tid, m, cuda.blockDim.x):
                top = row_max[r]
                for c in range(0, n, cuda.blockDim.z):
                    top = max(top, s[r, c])
                total = zero
                for c in range(0, n, cuda.blockDim.z):
                    p = zero
                    if top != neg_inf:
                        p = math.exp(s[r, c] - top)
                    s[r, c] = p
                    total += p
                a = online_rescale(row_max[r], top)
                alpha[r] = a
                row_sum[r] = row_sum[r] * a + total
                row_max[r] = top
            cuda.syncthreads()
            stage(v_cache, token_rows, n, dim, vector, kv)
            cuda.syncthreads()
            if row < m:  # the rows past m hold no query
                a = alpha[row]
                for d in range(lane, db, lanes):
                    x = o[row, d] * a
                    for c in range(0, n, cuda.blockDim.z):
                        x += s[row, c] * kv[c, d]
                    o[row, d] = x
        cuda.syncthreads()
        base = split * batch * heads_q * sq
        if row < m:
            total = row_sum[row]
            inv = v_mult / total if total > zero else zero
            dst = uint64(base + row_out[row])
            for d in range(lane, dim, lanes):
                out_part[dst, uint64(d)] = o[row, d] * inv
        for r in range(tid, m, cuda.blockDim.x):
            lse_part[uint64(base + row_out[r])] = finish_lse(row_max[r], row_sum[r])

    return forward


def _make_backward(dtype, cache_dtype, db, rows, tile, threads):
    load = _device.codec(dtype)[0]
    acc = acc_type(dtype)
    t = tile_math(acc)
    key_range, query_range = t.key_range, t.query_range
    softcap_score, softcap_grad, alibi_bias = t.softcap_score, t.softcap_grad, t.alibi_bias
    zero, neg_inf = acc(0.0), acc(-math.inf)
    db1, tile1 = db + 1, tile + 1

    @_device.inline
    def stage(cache, table, b, hk, heads_kv, block_size, j0, n, dim, dst):
        for e in range(cuda.threadIdx.x, tile * db, threads):
            c = udiv(e, db)
            d = e - c * db
            x = zero
            if c < n and d < dim:
                tok = j0 + c
                blk = table[b, udiv(tok, block_size)]
                x = load(cache[uint64((blk * block_size + umod(tok, block_size)) * heads_kv + hk), uint64(d)])
            dst[c, d] = x

    def backward(dout, q, k_cache, v_cache, table, lens, lse, delta, batch, heads_q, heads_kv, sq, dim,
                 block_size, scale, wl, wr, softcap, slopes, slope_stride, has_alibi, n_tiles, dq_acc, dk_acc,
                 dv_acc):
        group = udiv(heads_q, heads_kv)
        tile_id = umod(cuda.blockIdx.x, n_tiles)
        bh = udiv(cuda.blockIdx.x, n_tiles)
        b = udiv(bh, heads_kv)
        hk = bh - b * heads_kv
        j0 = tile_id * tile
        sk = lens[b]
        if j0 >= sk:  # the whole block leaves together: no barrier is skipped by some threads only
            return
        n = min(tile, sk - j0)
        tid = cuda.threadIdx.x
        ks = cuda.shared.array((tile, db1), acc)
        vs = cuda.shared.array((tile, db1), acc)
        dks = cuda.shared.array((tile, db1), acc)
        dvs = cuda.shared.array((tile, db1), acc)
        qs = cuda.shared.array((rows, db1), acc)
        dos = cuda.shared.array((rows, db1), acc)
        p = cuda.shared.array((rows, tile1), acc)
        ds = cuda.shared.array((rows, tile1), acc)
        row_lse = cuda.shared.array(rows, acc)
        row_delta = cuda.shared.array(rows, acc)
        stage(k_cache, table, b, hk, heads_kv, block_size, j0, n, dim, ks)
        stage(v_cache, table, b, hk, heads_kv, block_size, j0, n, dim, vs)
        for e in range(tid, tile * db, threads):
            dks[udiv(e, db), umod(e, db)] = zero
            dvs[udiv(e, db), umod(e, db)] = zero
        i_lo, i_hi = query_range(j0, j0 + n, sq, sk, wl, wr)
        for h in range(hk * group, (hk + 1) * group):
            q0 = (b * heads_q + h) * sq
            slope = slopes[b * slope_stride + h] if has_alibi else zero
            for i0 in range(i_lo, i_hi, rows):
                m = min(rows, i_hi - i0)
                cuda.syncthreads()
                for e in range(tid, rows * db, threads):
                    r = udiv(e, db)
                    d = e - r * db
                    x = zero
                    y = zero
                    if r < m and d < dim:
                        x = load(q[uint64(q0 + i0 + r), uint64(d)]) * scale
                        y = load(dout[uint64(q0 + i0 + r), uint64(d)])
                    qs[r, d] = x
                    dos[r, d] = y
                for r in range(tid, m, threads):
                    row_lse[r] = lse[uint64(q0 + i0 + r)]
                    row_delta[r] = delta[uint64(q0 + i0 + r)]
                cuda.syncthreads()
                for e in range(tid, m * n, threads):
                    r = udiv(e, n)
                    c = e - r * n
                    lo, hi = key_range(i0 + r, sq, sk, wl, wr)
                    pe = zero
                    dse = zero
                    if lo <= j0 + c and j0 + c < hi and row_lse[r] != neg_inf:
                        x = zero
                        dp = zero
                        for d in range(dim):
                            x += qs[r, d] * ks[c, d]
                            dp += dos[r, d] * vs[c, d]
                        capped = softcap_score(x, softcap)
                        y = capped
                        if has_alibi:
                            y += alibi_bias(slope, i0 + r, j0 + c, sq, sk)
                        pe = math.exp(y - row_lse[r])
                        dse = pe * (dp - row_delta[r]) * softcap_grad(capped, softcap)
                    p[r, c] = pe
                    ds[r, c] = dse
                cuda.syncthreads()
                for e in range(tid, n * db, threads):
                    c = udiv(e, db)
                    d = e - c * db
                    dk_x = zero
                    dv_x = zero
                    for r in range(m):
                        dv_x += p[r, c] * dos[r, d]
                        dk_x += ds[r, c] * qs[r, d]
                    dks[c, d] += dk_x
                    dvs[c, d] += dv_x
                for e in range(tid, m * db, threads):
                    r = udiv(e, db)
                    d = e - r * db
                    if d < dim:
                        x = zero
                        for c in range(n):
                            x += ds[r, c] * ks[c, d]
                        cuda.atomic.add(dq_acc, (uint64(q0 + i0 + r), uint64(d)), x * scale)
        cuda.syncthreads()
        for e in range(tid, n * db, threads):
            c = udiv(e, db)
            d = e - c * db
            if d < dim:
                tok = j0 + c
                row = (table[b, udiv(tok, block_size)] * block_size + umod(tok, block_size)) * heads_kv + hk
                cuda.atomic.add(dk_acc, (uint64(row), uint64(d)), dks[c, d])
                cuda.atomic.add(dv_acc, (uint64(row), uint64(d)), dvs[c, d])

    return backward


def _make_write(in_dtype, cache_dtype, db, rows, tile, threads):
    load = _device.codec(in_dtype)[0]
    store = _device.codec(cache_dtype)[1]

    def write(k, v, k_cache, v_cache, slots, heads, dim, k_scale, v_scale, cos, sin, positions, rotated,
              interleaved):
        """One thread per element of ``k``/``v`` ``[T * Hkv, D]``; with ``rotated`` the keys are turned by
        the rotary tables at ``positions[token]`` (the thread reads its feature's partner)."""
        e = cuda.grid(1)
        if e < k.shape[0] * dim:
            t = e // dim
            d = e - t * dim
            h = t % heads
            slot = slots[t // heads]
            if slot >= 0:
                row = uint64(slot * heads + h)  # slot = block * block_size + row: the cache's flat token
                key = load(k[uint64(t), uint64(d)])
                half = cos.shape[1]
                if rotated and d < 2 * half:
                    p = positions[t // heads]
                    if interleaved:
                        i = d // 2
                        other = load(k[uint64(t), uint64(d ^ 1)])
                        turn = -other if d % 2 == 0 else other
                    else:
                        i = d if d < half else d - half
                        other = load(k[uint64(t), uint64(d + half if d < half else d - half)])
                        turn = -other if d < half else other
                    key = key * cos[p, i] + turn * sin[p, i]
                k_cache[row, uint64(d)] = store(key / k_scale[h])
                v_cache[row, uint64(d)] = store(load(v[uint64(t), uint64(d)]) / v_scale[h])

    return write


def _make_convert(src_dtype, dtype, db, rows, tile, threads):
    store = _device.codec(dtype)[1]

    def convert(src, dst):
        e = cuda.grid(1)
        if e < src.shape[0]:
            dst[e] = store(src[e])

    return convert


def _make_zero(dtype, unused, db, rows, tile, threads):
    zero = acc_type(dtype)(0.0)

    def zero_fill(dst):
        e = cuda.grid(1)
        if e < dst.shape[0]:
            dst[e] = zero

    return zero_fill


_MAKERS = {"forward": _make_forward, "backward": _make_backward, "write": _make_write,
           "convert": _make_convert, "zero": _make_zero}


# --- host side ---------------------------------------------------------------------

def _flat_rows(x):
    """A 4-d device array as 2-d ``[prod(shape[:-1]), D]`` (what the kernels index)."""
    return _launch.rows(x)


@cuda.jit
def _cast_int32(src, dst):
    e = cuda.grid(1)
    if e < dst.size:
        width = dst.shape[1]
        dst[e // width, e % width] = src[e // width, e % width]


def device_ints(x):
    """An int32 index array on the device: int32 device arrays as they are, other device arrays cast
    there, host arrays uploaded once."""
    if not hasattr(x, "copy_to_host"):
        return _launch.to_device(np.asarray(x, np.int32))
    if np.dtype(x.dtype) == np.int32 and x.is_c_contiguous():
        return x
    shape = tuple(x.shape)
    as2d = x.reshape(shape[0], 1) if len(shape) == 1 and x.is_c_contiguous() else x
    dst = cuda.device_array(tuple(as2d.shape), np.int32)
    if dst.size:
        _cast_int32[_launch.blocks(dst.size, 256), 256](as2d, dst)
    return dst.reshape(*shape)


@cuda.jit
def _check_indices(table, lens, num_blocks, block_size, seq_q, capacity, out):
    """out = [first bad length's sequence, first bad entry read (flat), longest length], by atomics."""
    e = cuda.grid(1)
    batch, width = table.shape
    if e < batch:
        n = lens[e]
        if n < 0 or n > capacity or (n > 0 and n < seq_q):
            cuda.atomic.min(out, 0, e)
        else:
            cuda.atomic.max(out, 2, n)
    if e < batch * width:
        b = e // width
        j = e - b * width
        n = lens[b]
        if 0 <= n and n <= capacity and j * block_size < n:  # an entry the kernels read
            t = table[b, j]
            if t < 0 or t >= num_blocks:
                cuda.atomic.min(out, 1, e)


def check_indices(table, lens, num_blocks, block_size, seq_q, capacity):
    """``(bad_len, bad_entry, max_len)`` of int32 device index arrays; ``bad_*`` past the end when none."""
    batch, width = (int(s) for s in table.shape)
    out = cuda.to_device(np.array([batch, batch * width, 0], np.int64))
    n = max(batch * width, batch)
    if n:
        _check_indices[_launch.blocks(n, 256), 256](table, lens, num_blocks, block_size, seq_q, capacity, out)
    return tuple(int(x) for x in out.copy_to_host())


def _device_slots(slots):
    if hasattr(slots, "copy_to_host") and np.dtype(slots.dtype) == np.int64:
        return slots
    return _launch.to_device(np.asarray(slots.copy_to_host() if hasattr(slots, "copy_to_host") else slots,
                                        np.int64))


def _scales(values, acc_np):
    return _launch.to_device(np.asarray(values, acc_np))


def num_splits(spec, blocks):
    """Key splits per block so that a few hundred blocks fill the GPU (1 when there are enough)."""
    want = -(-1024 // max(blocks, 1))
    by_length = -(-spec.max_seq_len // config.cuda_split_min_keys)
    return max(1, min(want, by_length))


def _vector_rows(cache, dim):
    """Whether 16-byte vector loads can read the rows (of ``dim`` values) of ``cache``: an aligned base,
    whole vectors a row."""
    width = _device.vector_width(cache.dtype.itemsize)
    face = getattr(cache, "__cuda_array_interface__", None)  # None under the simulator, which needs no alignment
    aligned = face is None or face["data"][0] % _device.VECTOR_BYTES == 0
    return dim % width == 0 and aligned


def _zeros(shape, dtype):
    out = cuda.device_array(tuple(shape), dtype)
    size = int(np.prod(tuple(shape)))
    if size:
        kernel = _compiled("zero", (np.dtype(dtype), None), 16)[0]
        kernel[_launch.blocks(size, 256), 256](out.reshape(size))
    return out


def use_mma(spec, k_cache, has_scales):
    """Whether a paged forward runs on tensor cores: a prefill (``Sq > 1``) with a cache of the queries'
    16-bit type and no fp8 scales, where :func:`fastattn.cuda.attention.use_mma` allows it."""
    from .attention import use_mma as dense_use_mma

    return (spec.seq_q > 1 and not has_scales and np.dtype(k_cache.dtype) == np.dtype(spec.dtype)
            and dense_use_mma(spec))


def _mma_prefill(dtype, db, warps):
    key = ("prefill-mma", np.dtype(dtype), db, warps)
    if key not in _kernels:
        kind = "f16" if np.dtype(dtype) == np.float16 else "bf16"
        _kernels[key] = _device.kernel(_tensor_core.make_paged_prefill(kind, db, warps),
                                       _tensor_core.launch_bounds(db, warps), lto=True)
    return _kernels[key]


def forward(q, k_cache, v_cache, table, lens, slopes, spec, q_scale=1.0, k_scale=None, v_scale=None,
            out_dtype=None, out_scale=1.0):
    """Launch the paged forward kernel and merge its splits; return (out, lse) as device arrays.

    A prefill of float16/bfloat16 queries on a cache of their dtype runs on tensor cores (:func:`use_mma`).
    """
    db = _check_head_dim(spec)
    acc_np = np.dtype(spec.accum_dtype)
    arrays = [_flat_rows(x) for x in (q, k_cache, v_cache)]
    words = _launch.words(*arrays) if use_mma(spec, k_cache, k_scale is not None) else None
    if words is not None:
        arrays = words
        warps = config.cuda_mma_warps
        kernel, threads = _mma_prefill(spec.dtype, db, warps), 32 * warps
        blocks_x = -(-(spec.group * spec.seq_q) // (16 * warps))
    else:
        kernel, rows, _ = _compiled("forward", (np.dtype(q.dtype), np.dtype(k_cache.dtype)), db,
                                    min(decode_rows(spec), config.cuda_paged_rows))
        threads = config.cuda_paged_threads
        per_block = min(spec.group, rows)
        blocks_x = -(-spec.group // per_block) * -(-spec.seq_q // max(1, rows // per_block))
    n_split = num_splits(spec, blocks_x * spec.batch * spec.heads_kv)
    n_rows = spec.batch * spec.heads_q * spec.seq_q
    out_part = cuda.device_array((n_split * n_rows, spec.head_dim), acc_np)
    lse_part = cuda.device_array(n_split * n_rows, acc_np)
    has_scales = k_scale is not None
    k_dev = _scales(k_scale, acc_np) if has_scales else cuda.device_array(1, acc_np)
    v_dev = _scales(v_scale, acc_np) if has_scales else k_dev
    if n_rows:
        grid = blocks_x * spec.batch * spec.heads_kv * n_split
        kernel[grid, threads](
            *arrays, device_ints(table), device_ints(lens),
            spec.batch, spec.heads_q, spec.heads_kv, spec.seq_q, spec.head_dim, spec.block_size,
            acc_np.type(spec.scale * q_scale), k_dev, v_dev, has_scales, spec.window_left, spec.window_right,
            acc_np.type(spec.softcap), *slopes_args(slopes, spec), n_split,
            _vector_rows(k_cache, spec.head_dim) and _vector_rows(v_cache, spec.head_dim), out_part, lse_part)
    shape = (n_split,) + tuple(q.shape)
    out, lse = merge(out_part.reshape(*shape), lse_part.reshape(*shape[:-1]),
                     spec.dtype if out_dtype is None else out_dtype, 1.0 / out_scale)
    return out, lse


def _convert(src, dtype):
    """A device array of dtype holding src (accumulation dtype), rounded to nearest even."""
    dst = _launch.empty(src.shape, dtype)
    size = int(np.prod(tuple(src.shape)))
    if size:
        kernel = _compiled("convert", (np.dtype(src.dtype), np.dtype(dtype)), 16)[0]
        kernel[_launch.blocks(size, 256), 256](src.reshape(size), _launch.kernel_view(dst).reshape(size))
    return dst


def backward(dout, q, k_cache, v_cache, out, lse, table, lens, slopes, spec):
    """Launch the delta and backward kernels; return (dq, dk_cache, dv_cache) as device arrays."""
    from .attention import _kernel as _dense_kernel

    db = _check_head_dim(spec)
    acc_np = np.dtype(spec.accum_dtype)
    n_rows = spec.batch * spec.heads_q * spec.seq_q
    cache_rows = int(np.prod(tuple(k_cache.shape)[:3]))
    dq_acc = _zeros((n_rows, spec.head_dim), acc_np)
    dk_acc = _zeros((cache_rows, spec.head_dim), acc_np)
    dv_acc = _zeros((cache_rows, spec.head_dim), acc_np)
    if n_rows and spec.max_seq_len:
        threads = config.cuda_paged_threads
        delta = cuda.device_array(n_rows, acc_np)
        _dense_kernel("delta", spec.dtype, db)[_launch.blocks(n_rows, config.cuda_threads), config.cuda_threads](
            _flat_rows(dout), _flat_rows(out), spec.head_dim, delta)
        kernel, _, tile = _compiled("backward", (np.dtype(spec.dtype), np.dtype(k_cache.dtype)), db)
        n_tiles = _launch.blocks(spec.max_seq_len, tile)
        kernel[n_tiles * spec.batch * spec.heads_kv, threads](
            _flat_rows(dout), _flat_rows(q), _flat_rows(k_cache), _flat_rows(v_cache), device_ints(table),
            device_ints(lens), _launch.flat(lse), delta, spec.batch, spec.heads_q, spec.heads_kv, spec.seq_q,
            spec.head_dim, spec.block_size, acc_np.type(spec.scale), spec.window_left, spec.window_right,
            acc_np.type(spec.softcap), *slopes_args(slopes, spec), n_tiles, dq_acc, dk_acc, dv_acc)
    return (_convert(dq_acc.reshape(*tuple(q.shape)), spec.dtype),
            _convert(dk_acc.reshape(*tuple(k_cache.shape)), spec.dtype),
            _convert(dv_acc.reshape(*tuple(v_cache.shape)), spec.dtype))


def write(k, v, k_cache, v_cache, slots, k_scale, v_scale, rotary=None):
    """Write k, v [T, Hkv, D] into the device caches at ``slots`` (negative: skipped), in place; ``rotary``
    (a :class:`~fastattn._validate.RotaryPlan` with positions ``[1, T]``) turns the keys on the way."""
    size = int(np.prod(tuple(k.shape)))
    if size == 0:
        return
    tokens, heads, dim = (int(s) for s in k.shape)
    kernel = _compiled("write", (np.dtype(k.dtype), np.dtype(k_cache.dtype)), 16)[0]
    if rotary is None:
        tables = [cuda.device_array((1, 1), np.float32)] * 2
        positions, interleaved = np.zeros(1, np.int64), False
    else:
        tables = [t if np.dtype(t.dtype) == np.float32 and t.is_c_contiguous()
                  else _launch.to_device(t.copy_to_host().astype(np.float32)) for t in (rotary.cos, rotary.sin)]
        positions, interleaved = rotary.positions.reshape(-1), rotary.interleaved
    kernel[_launch.blocks(size, 256), 256](
        _launch.kernel_view(k).reshape(tokens * heads, dim), _launch.kernel_view(v).reshape(tokens * heads, dim),
        _flat_rows(k_cache), _flat_rows(v_cache), _device_slots(slots), heads, dim,
        _scales(k_scale, np.float32), _scales(v_scale, np.float32), *tables, _launch.to_device(positions),
        rotary is not None, interleaved)


# --- what cuda-report compiles -------------------------------------------------------

#: (q dtype, cache dtype) pairs the dispatch launches.
PAIRS = (("float32", "float32"), ("float64", "float64"), ("float16", "float16"), ("bfloat16", "bfloat16"),
         ("float32", "float8_e4m3fn"), ("float32", "float8_e5m2"), ("float16", "float8_e4m3fn"),
         ("bfloat16", "float8_e5m2"))


def signature(name, q_dtype, cache_dtype):
    from numba import boolean, int32, int64

    acc = acc_type(q_dtype)
    q2, c2, a1 = element_type(q_dtype)[:, ::1], element_type(cache_dtype)[:, ::1], acc[::1]
    table, lens = int32[:, ::1], int32[::1]
    i = int32
    if name == "forward":
        return (q2, c2, c2, table, lens, i, i, i, i, i, i, acc, a1, a1, boolean, i, i, acc, a1, i, boolean, i,
                boolean, acc[:, ::1], a1)
    if name == "backward":
        return (q2, q2, c2, c2, table, lens, a1, a1, i, i, i, i, i, i, acc, i, i, acc, a1, i, boolean, i,
                acc[:, ::1], acc[:, ::1], acc[:, ::1])
    if name == "write":
        return (q2, q2, c2, c2, int64[::1], i, i, float32[::1], float32[::1], float32[:, ::1], float32[:, ::1],
                int64[::1], boolean, boolean)
    return (acc[::1], element_type(cache_dtype)[::1])


def variants(head_dims=None):
    """Every paged kernel in every dtype pair and head-dim bucket the dispatch launches (for ``cuda-report``)."""
    from .._dtypes import dtype_named

    out = []
    buckets = [d for d in HEAD_DIMS if head_dims is None or d in head_dims]
    for q_name, c_name in PAIRS:
        q_dtype, c_dtype = dtype_named(q_name), dtype_named(c_name)
        for db in buckets:
            rows, tile = _shape("forward", acc_type(q_dtype), db)
            role = "decode"
            out.append(_launch.Variant(f"paged_forward[q={q_name}]", role, c_name, db, config.cuda_paged_threads,
                                       _make_forward(q_dtype, c_dtype, db, rows, tile, config.cuda_paged_threads),
                                       signature("forward", q_dtype, c_dtype), launch_bounds("forward")))
            if q_name == c_name and q_name in ("float16", "bfloat16"):
                kind = "f16" if q_name == "float16" else "bf16"
                out.append(_launch.Variant("prefill-mma", "forward", c_name, db, 32 * _tensor_core.WARPS,
                                           _tensor_core.make_paged_prefill(kind, db),
                                           _tensor_core.paged_signature(), _tensor_core.launch_bounds(db),
                                           _mma.MIN_CC, (_mma.SOURCE,)))
            if q_name == c_name:
                rows, tile = _shape("backward", acc_type(q_dtype), db)
                out.append(_launch.Variant("paged_backward", "backward", c_name, db, config.cuda_paged_threads,
                                           _make_backward(q_dtype, c_dtype, db, rows, tile,
                                                          config.cuda_paged_threads),
                                           signature("backward", q_dtype, c_dtype)))
    for in_name in ("float32", "float16", "bfloat16"):
        for c_name in (in_name, "float8_e4m3fn", "float8_e5m2"):
            in_dtype, c_dtype = dtype_named(in_name), dtype_named(c_name)
            out.append(_launch.Variant(f"write_kv_cache[k={in_name}]", "other", c_name, 0, 256,
                                       _make_write(in_dtype, c_dtype, 16, 0, 0, 256),
                                       signature("write", in_dtype, c_dtype)))
    for name in ("float32", "float16", "bfloat16", "float64"):
        dtype = dtype_named(name)
        src = np.dtype(np.float64 if name == "float64" else np.float32)
        out.append(_launch.Variant("convert", "other", name, 0, 256, _make_convert(src, dtype, 16, 0, 0, 256),
                                   signature("convert", src, dtype)))
    return out
