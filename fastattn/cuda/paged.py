"""CUDA kernels of the paged attention family (numba.cuda).

The twin of :mod:`fastattn.cpu.paged`.  Forward: one thread block per
(sequence, KV head, tile of query rows, key split).  As on the CPU, the query
heads of a KV group are stacked into the block's rows, so each key and value
row is staged from the cache into shared memory once per group; the threads
then share the work of a tile: scores (one (row, key) pair each), the online
softmax update (one row each) and the output update (one (row, d) each).
Splits of long sequences ("flash decoding") write partial states that the
merge kernel of :mod:`fastattn.cuda.attention` combines.

Backward (FlashAttention-2 style): one block per (sequence, tile of keys, KV
head) accumulates dk/dv for its keys in shared memory and adds dq with
``cuda.atomic.add``; the key gradients go to the physical cache rows with
``cuda.atomic.add`` too, so blocks shared by several sequences get the sum of
their contributions.  Sums are float32 (float64 for float64 inputs) and are
converted to the cache dtype at the end.

Cache writes: one thread per element, fp8 stored as round-to-nearest-even
``saturate(x / scale)``.
"""
import math

import numpy as np
from numba import cuda, float32, float64

from .._config import config
from .._dtypes import codec_of, narrow, widen_fp8
from .._tile import finish_lse, key_range, online_rescale, query_range
from . import _launch
from .attention import _check_head_dim, _compiled as _dense_kernel, _score, _slopes, merge

_kernels = {}
_SHARED_BYTES = 48 * 1024  # static shared memory per block


def _acc_type(dtype):
    return float64 if np.dtype(dtype) == np.float64 else float32


def _tiles(acc, max_dim, row_arrays, tile_arrays, score_arrays):
    """(rows, keys) per block, halved from the config until the shared arrays fit."""
    rows, tile = config.cuda_paged_rows, config.cuda_paged_block_k
    itemsize = 8 if acc == float64 else 4

    def size(r, t):
        return ((row_arrays * r + tile_arrays * t) * (max_dim + 1) + score_arrays * r * t + 3 * r) * itemsize
    while size(rows, tile) > _SHARED_BYTES and (rows > 1 or tile > 1):
        if tile >= rows:
            tile //= 2
        else:
            rows //= 2
    return rows, tile


def _compiled(name, acc, max_dim):
    rows, tile = _tiles(acc, max_dim, *_SHARED_USE[name])
    key = (name, acc, rows, tile, max_dim)
    if key not in _kernels:
        _kernels[key] = _MAKERS[name](acc, rows, tile, max_dim)
    return _kernels[key], rows, tile


@cuda.jit(device=True)
def _stage(cache, table, b, hk, j0, n, dim, codec, dst, mult):
    """Cooperatively copy tokens j0..j0+n of KV head hk of sequence b into shared memory, times mult."""
    bs = cache.shape[1]
    for e in range(cuda.threadIdx.x, n * dim, cuda.blockDim.x):
        r = e // dim
        d = e - r * dim
        t = j0 + r
        dst[r, d] = widen_fp8(cache[table[b, t // bs], t % bs, hk, d], codec) * mult


@cuda.jit(device=True)
def _block_rows(rows, group, sq):
    """This block's (head chunk start h0, heads n_h, first query i0, queries m_q) in its KV group."""
    per_block = min(group, rows)
    mq = max(1, rows // per_block)
    n_chunks = (group + per_block - 1) // per_block
    chunk = cuda.blockIdx.x % n_chunks
    i0 = (cuda.blockIdx.x // n_chunks) * mq
    return chunk * per_block, min(per_block, group - chunk * per_block), i0, min(mq, sq - i0)


def _make_forward(acc, rows, tile, max_dim):
    width = max_dim + 1  # a padded row: threads reading one column of many rows hit different banks

    @cuda.jit
    def forward(q, k_cache, v_cache, table, lens, q_codec, kv_codec, q_mult, k_mult, v_mult, wl, wr,
                softcap, slopes, has_alibi, out_part, lse_part):
        batch, heads_q, sq, dim = q.shape
        heads_kv = k_cache.shape[2]
        group = heads_q // heads_kv
        b = cuda.blockIdx.y // heads_kv
        hk = cuda.blockIdx.y % heads_kv
        split = cuda.blockIdx.z
        n_split = cuda.gridDim.z
        g0, n_h, i0, m_q = _block_rows(rows, group, sq)
        h0 = hk * group + g0
        m = n_h * m_q
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        qs = cuda.shared.array((rows, width), acc)
        acc_s = cuda.shared.array((rows, width), acc)
        ks = cuda.shared.array((tile, width), acc)
        vs = cuda.shared.array((tile, width), acc)
        s = cuda.shared.array((rows, tile), acc)
        row_max = cuda.shared.array(rows, acc)
        row_sum = cuda.shared.array(rows, acc)
        alpha = cuda.shared.array(rows, acc)
        sk = lens[b]
        for e in range(tid, m * dim, nt):
            r = e // dim
            d = e - r * dim
            qs[r, d] = widen_fp8(q[b, h0 + r // m_q, i0 + r % m_q, d], q_codec) * q_mult * k_mult[hk]
            acc_s[r, d] = 0.0
        for r in range(tid, m, nt):
            row_max[r] = -math.inf
            row_sum[r] = 0.0
        chunk = (sk + n_split - 1) // n_split
        j_lo = max(key_range(i0, sq, sk, wl, wr)[0], split * chunk)
        j_hi = min(key_range(i0 + m_q - 1, sq, sk, wl, wr)[1], (split + 1) * chunk)
        cuda.syncthreads()
        for j0 in range(j_lo, j_hi, tile):
            n = min(tile, j_hi - j0)
            _stage(k_cache, table, b, hk, j0, n, dim, kv_codec, ks, 1.0)
            _stage(v_cache, table, b, hk, j0, n, dim, kv_codec, vs, 1.0)
            cuda.syncthreads()
            for e in range(tid, m * n, nt):
                r = e // n
                c = e - r * n
                i = i0 + r % m_q
                lo, hi = key_range(i, sq, sk, wl, wr)
                s[r, c] = -math.inf
                if lo <= j0 + c and j0 + c < hi:
                    s[r, c] = _score(qs[r], ks, c, dim, i, j0 + c, sq, sk, softcap,
                                     slopes[b, h0 + r // m_q], has_alibi)[0]
            cuda.syncthreads()
            for r in range(tid, m, nt):
                top = row_max[r]
                for c in range(n):
                    top = max(top, s[r, c])
                total = 0.0
                for c in range(n):
                    p = math.exp(s[r, c] - top) if s[r, c] != -math.inf else 0.0
                    s[r, c] = p
                    total += p
                alpha[r] = online_rescale(row_max[r], top)
                row_sum[r] = row_sum[r] * alpha[r] + total
                row_max[r] = top
            cuda.syncthreads()
            for e in range(tid, m * dim, nt):
                r = e // dim
                d = e - r * dim
                x = acc_s[r, d] * alpha[r]
                for c in range(n):
                    x += s[r, c] * vs[c, d]
                acc_s[r, d] = x
            cuda.syncthreads()
        for e in range(tid, m * dim, nt):
            r = e // dim
            d = e - r * dim
            inv = v_mult[hk] / row_sum[r] if row_sum[r] > 0.0 else 0.0
            out_part[split, b, h0 + r // m_q, i0 + r % m_q, d] = acc_s[r, d] * inv
        for r in range(tid, m, nt):
            lse_part[split, b, h0 + r // m_q, i0 + r % m_q] = finish_lse(row_max[r], row_sum[r])

    return forward


def _make_backward(acc, rows, tile, max_dim):
    width = max_dim + 1  # padded rows, as in the forward

    @cuda.jit
    def backward(dout, q, k_cache, v_cache, table, lens, lse, delta, codec, scale, wl, wr,
                 dq_acc, dk_acc, dv_acc):
        batch, heads_q, sq, dim = q.shape
        bs, heads_kv = k_cache.shape[1], k_cache.shape[2]
        group = heads_q // heads_kv
        b = cuda.blockIdx.y // heads_kv
        hk = cuda.blockIdx.y % heads_kv
        j0 = cuda.blockIdx.x * tile
        sk = lens[b]
        if j0 >= sk:  # the whole block leaves together: no barrier is skipped by some threads only
            return
        n = min(tile, sk - j0)
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        ks = cuda.shared.array((tile, width), acc)
        vs = cuda.shared.array((tile, width), acc)
        dks = cuda.shared.array((tile, width), acc)
        dvs = cuda.shared.array((tile, width), acc)
        qs = cuda.shared.array((rows, width), acc)
        dos = cuda.shared.array((rows, width), acc)
        p = cuda.shared.array((rows, tile), acc)
        ds = cuda.shared.array((rows, tile), acc)
        row_lse = cuda.shared.array(rows, acc)
        row_delta = cuda.shared.array(rows, acc)
        _stage(k_cache, table, b, hk, j0, n, dim, codec, ks, 1.0)
        _stage(v_cache, table, b, hk, j0, n, dim, codec, vs, 1.0)
        for e in range(tid, n * dim, nt):
            dks[e // dim, e % dim] = 0.0
            dvs[e // dim, e % dim] = 0.0
        i_lo, i_hi = query_range(j0, j0 + n, sq, sk, wl, wr)
        for h in range(hk * group, (hk + 1) * group):
            for i0 in range(i_lo, i_hi, rows):
                m = min(rows, i_hi - i0)
                cuda.syncthreads()
                for e in range(tid, m * dim, nt):
                    r = e // dim
                    d = e - r * dim
                    qs[r, d] = widen_fp8(q[b, h, i0 + r, d], codec) * scale
                    dos[r, d] = widen_fp8(dout[b, h, i0 + r, d], codec)
                for r in range(tid, m, nt):
                    row_lse[r] = lse[b, h, i0 + r]
                    row_delta[r] = delta[b, h, i0 + r]
                cuda.syncthreads()
                for e in range(tid, m * n, nt):
                    r = e // n
                    c = e - r * n
                    lo, hi = key_range(i0 + r, sq, sk, wl, wr)
                    p[r, c] = 0.0
                    ds[r, c] = 0.0
                    if lo <= j0 + c and j0 + c < hi and row_lse[r] != -math.inf:
                        x = 0.0
                        dp = 0.0
                        for d in range(dim):
                            x += qs[r, d] * ks[c, d]
                            dp += dos[r, d] * vs[c, d]
                        e_x = math.exp(x - row_lse[r])
                        p[r, c] = e_x
                        ds[r, c] = e_x * (dp - row_delta[r])
                cuda.syncthreads()
                for e in range(tid, n * dim, nt):
                    c = e // dim
                    d = e - c * dim
                    dk_x = 0.0
                    dv_x = 0.0
                    for r in range(m):
                        dv_x += p[r, c] * dos[r, d]
                        dk_x += ds[r, c] * qs[r, d]
                    dks[c, d] += dk_x
                    dvs[c, d] += dv_x
                for e in range(tid, m * dim, nt):
                    r = e // dim
                    d = e - r * dim
                    x = 0.0
                    for c in range(n):
                        x += ds[r, c] * ks[c, d]
                    cuda.atomic.add(dq_acc, (b, h, i0 + r, d), x * scale)
        cuda.syncthreads()
        for e in range(tid, n * dim, nt):
            c = e // dim
            d = e - c * dim
            t = j0 + c
            blk = table[b, t // bs]
            cuda.atomic.add(dk_acc, (blk, t % bs, hk, d), dks[c, d])
            cuda.atomic.add(dv_acc, (blk, t % bs, hk, d), dvs[c, d])

    return backward


def _make_write(acc, rows, tile, max_dim):
    @cuda.jit
    def write(k, v, k_cache, v_cache, slots, in_codec, cache_codec, k_scale, v_scale):
        tokens, heads, dim = k.shape
        bs = k_cache.shape[1]
        e = cuda.grid(1)
        if e < tokens * heads * dim:
            d = e % dim
            h = (e // dim) % heads
            t = e // (dim * heads)
            slot = slots[t]
            if slot >= 0:
                blk = slot // bs
                row = slot - blk * bs
                k_cache[blk, row, h, d] = narrow(widen_fp8(k[t, h, d], in_codec) / k_scale[h], cache_codec)
                v_cache[blk, row, h, d] = narrow(widen_fp8(v[t, h, d], in_codec) / v_scale[h], cache_codec)

    return write


def _make_convert(acc, rows, tile, max_dim):
    @cuda.jit
    def convert(src, codec, dst):
        e = cuda.grid(1)
        if e < src.size:
            dst[e] = narrow(src[e], codec)

    return convert


_MAKERS = {"forward": _make_forward, "backward": _make_backward, "write": _make_write,
           "convert": _make_convert}
#: shared arrays per kernel: (rows x D, keys x D, rows x keys) counts, for :func:`_tiles`.
_SHARED_USE = {"forward": (2, 2, 1), "backward": (2, 4, 2), "write": (0, 0, 0), "convert": (0, 0, 0)}


# --- host side ---------------------------------------------------------------------

def _max_dim(spec):
    _check_head_dim(spec)
    return min(config.cuda_max_head_dim, -(-spec.head_dim // 16) * 16)


def _to_device(x, dtype):
    return _launch.to_device(np.asarray(x, dtype))


def num_splits(spec, blocks):
    """Key splits per block so that a few hundred blocks fill the GPU (1 when there are enough)."""
    want = -(-1024 // max(blocks, 1))
    by_length = -(-spec.max_seq_len // config.cuda_split_min_keys)
    return max(1, min(want, by_length))


def forward(q, k_cache, v_cache, table, lens, slopes, spec, q_scale=1.0, k_scale=None, v_scale=None,
            out_dtype=None, out_scale=1.0):
    """Launch the paged forward kernel and merge its splits; return (out, lse) as device arrays."""
    acc_np = spec.accum_dtype
    acc = _acc_type(acc_np)
    kernel, rows, _ = _compiled("forward", acc, _max_dim(spec))
    per_block = min(spec.group, rows)
    blocks_x = -(-spec.group // per_block) * -(-spec.seq_q // max(1, rows // per_block))
    n_split = num_splits(spec, blocks_x * spec.batch * spec.heads_kv)
    out_part = cuda.device_array((n_split,) + tuple(q.shape), acc_np)
    lse_part = cuda.device_array((n_split,) + tuple(q.shape[:3]), acc_np)
    ones = np.ones(spec.heads_kv, acc_np)
    if spec.batch * spec.heads_q * spec.seq_q:
        kernel[(blocks_x, spec.batch * spec.heads_kv, n_split), config.cuda_paged_threads](
            _launch.kernel_view(q), _launch.kernel_view(k_cache), _launch.kernel_view(v_cache),
            _to_device(table, np.int32), _to_device(lens, np.int32), codec_of(q.dtype),
            codec_of(k_cache.dtype), spec.scale * q_scale,
            _to_device(ones if k_scale is None else k_scale, acc_np),
            _to_device(ones if v_scale is None else v_scale, acc_np),
            spec.window_left, spec.window_right, spec.softcap, *_slopes(slopes, spec), out_part, lse_part)
    return merge(out_part, lse_part, spec.dtype if out_dtype is None else out_dtype, 1.0 / out_scale)


def _convert(src, dtype):
    """A device array of dtype holding src (accumulation dtype), rounded to nearest even."""
    dst = _launch.empty(src.shape, dtype)
    if src.size:
        kernel = _compiled("convert", _acc_type(src.dtype), 16)[0]
        kernel[_launch.blocks(src.size, 256), 256](src.reshape(src.size), codec_of(dtype),
                                                   _launch.kernel_view(dst).reshape(src.size))
    return dst


def backward(dout, q, k_cache, v_cache, out, lse, table, lens, spec):
    """Launch the delta and backward kernels; return (dq, dk_cache, dv_cache) as device arrays."""
    acc_np = spec.accum_dtype
    acc = _acc_type(acc_np)
    dq_acc = cuda.to_device(np.zeros(q.shape, acc_np))
    dk_acc = cuda.to_device(np.zeros(k_cache.shape, acc_np))
    dv_acc = cuda.to_device(np.zeros(v_cache.shape, acc_np))
    n_rows = spec.batch * spec.heads_q * spec.seq_q
    if n_rows and spec.max_seq_len:
        codec = codec_of(spec.dtype)
        threads = config.cuda_paged_threads
        delta = cuda.device_array(q.shape[:3], acc_np)
        inputs = [_launch.kernel_view(x) for x in (dout, q, k_cache, v_cache)]
        _dense_kernel("delta", acc, config.cuda_block_k, config.cuda_max_head_dim)[
            _launch.blocks(n_rows, threads), threads](inputs[0], _launch.kernel_view(out), codec, delta)
        kernel, _, tile = _compiled("backward", acc, _max_dim(spec))
        grid = (_launch.blocks(spec.max_seq_len, tile), spec.batch * spec.heads_kv)
        kernel[grid, threads](*inputs, _to_device(table, np.int32), _to_device(lens, np.int32), lse, delta,
                              codec, spec.scale, spec.window_left, spec.window_right, dq_acc, dk_acc, dv_acc)
    return tuple(_convert(x, spec.dtype) for x in (dq_acc, dk_acc, dv_acc))


def write(k, v, k_cache, v_cache, slots, k_scale, v_scale):
    """Write k, v [T, Hkv, D] into the device caches at ``slots`` (negative: skipped), in place."""
    if k.size == 0:
        return
    acc_np = np.float64 if k.dtype == np.float64 and k_cache.dtype == np.float64 else np.float32
    kernel = _compiled("write", _acc_type(acc_np), 16)[0]
    kernel[_launch.blocks(k.size, 256), 256](
        _launch.kernel_view(k), _launch.kernel_view(v), _launch.kernel_view(k_cache),
        _launch.kernel_view(v_cache), _to_device(slots, np.int64), codec_of(k.dtype),
        codec_of(k_cache.dtype), _to_device(k_scale, acc_np), _to_device(v_scale, acc_np))
