"""Attention on tensor cores (float16/bfloat16 inputs, sm_80+), FlashAttention-2's register layout.

The kernels here run :mod:`fastattn.cuda._mma`'s ``mma.sync.m16n8k16`` on
fragments that stay in registers; docs/design.md ("Tensor cores") draws the
layouts.  The forward: a block of four warps owns 64 query rows of one
(batch, head), warp ``w`` rows ``16 w ... 16 w + 15``.  Per tile of ``BN``
keys:

1. the block stages the keys and values in shared memory as 32-bit words,
   two features each (a B fragment of ``Kᵀ`` is one word; the B fragments of
   ``V`` pair two keys, and ``ldmatrix .trans`` reads them transposed);
2. each warp forms its ``16 x BN`` scores with ``D / 16 x BN / 8`` ``mma``
   instructions, in float32 accumulator fragments: lane ``(g, t)`` holds rows
   ``g`` and ``g + 8``, keys ``8 n + 2 t, 8 n + 2 t + 1``;
3. scale, softcap, ALiBi, bias/mask and the causal/window limits are applied
   element by element on the fragments (each element knows its row and key);
   the row maximum is reduced across the four lanes of a row with two
   butterfly shuffles, and the probabilities are exponentiated in place (the
   row sums stay per lane until the end, as in FlashAttention-2);
4. the probabilities are rounded to the input's 16-bit type and repacked as A
   fragments (an accumulator pair of two adjacent key tiles *is* an A register
   of a 16-key step), and ``O += P V`` runs ``BN / 16 x D / 8`` ``mma``.

The backward's dQ (:func:`make_dq`) and dK/dV (:func:`make_dkdv`) kernels and
the paged prefill (:func:`make_paged_prefill`) are built from the same steps.
Arrays are read as ``uint32`` views (two 16-bit values per word), so the head
dimension must be even; 16-bit outputs are written the same way.
"""
import math
from types import SimpleNamespace

from numba import cuda, float32, int32, int64, uint32, uint64

from . import _mma
from ._device import inline, simulated, tile_math, udiv, umod

#: Warps per block (each owns 16 query rows) unless ``config.cuda_mma_warps`` says otherwise.
WARPS = 4
#: Byte alignment of the shared tiles ``ldmatrix`` reads (each row it addresses must be 16-byte aligned; the
#: padded row stride keeps that); the simulator takes no alignment.
ALIGN = None if simulated() else 16


def launch_bounds(db, warps=WARPS, name="forward"):
    """``(threads, min_blocks)``: blocks of ``warps`` warps; the forward 16 warps an SM (25% occupancy, at
    most 128 registers a thread) up to D = 128, half that above, where the output fragments alone take
    D / 2; the backward's dQ and dK/dV kernels (scores, dP, P and one or two gradients at once) 8."""
    if name in ("dq", "dkdv"):
        return 32 * warps, max(1, 8 // warps)
    return 32 * warps, (16 if db <= 128 else 8) // warps


def block_keys(db):
    """Keys per tile: fewer as the head dimension grows (each lane holds ``BN / 2`` scores and ``D / 2``
    outputs in its 128 registers)."""
    return 64 if db <= 32 else 32 if db <= 64 else 16


@inline
def q_word(q, q0, row_a, row_b, sq, n_words, kk, r, t):
    """Register ``r`` of the A fragment of query rows ``row_a``/``row_b`` (= ``row_a + 8``), features
    ``16 kk ...``: a word of the ``uint32`` view, 0 past the rows or the head dimension."""
    row = row_a if r % 2 == 0 else row_b
    w = kk * 8 + t + (4 if r >= 2 else 0)
    x = uint32(0)
    if row < sq and w < n_words:
        x = q[uint64(q0 + row), uint64(w)]
    return x


def row_stager(rows, words, threads):
    """``stage(x, y, x_s, y_s, base, first, end, n_words, tid)``: the block copies rows ``first ...
    first + rows - 1`` of the ``uint32`` views ``x`` and ``y`` (global rows ``base + i``) into the shared
    ``x_s`` and ``y_s``, ``words`` words a row, zeros past row ``end`` or the head dimension."""
    u0 = uint32(0)

    @inline
    def stage(x, y, x_s, y_s, base, first, end, n_words, tid):
        e = tid
        while e < rows * words:
            r = udiv(e, words)
            w = e - r * words
            a, c = u0, u0
            if first + r < end and w < n_words:
                a = x[uint64(base + first + r), uint64(w)]
                c = y[uint64(base + first + r), uint64(w)]
            x_s[r, w] = a
            y_s[r, w] = c
            e += threads

    return stage


def fragment_steps(kind, n_frags, n_dim_frags, n_dim_steps=0):
    """The steps every tensor-core kernel takes on one warp's fragments, inlined into it.

    ``n_frags`` accumulator tiles of 8 columns hold a ``16 x 8 n_frags`` product (the scores); the second
    product's accumulators are ``n_dim_frags`` tiles (the head dimension), its depth ``16 n_dim_steps``.
    Lane ``(g, t)`` holds rows ``g`` ("a") and ``g + 8`` ("b") of each.
    """
    mma, pack = _mma.ops(kind)
    ldmatrix_x4_trans = _mma.ldmatrix_x4_trans
    n_steps = n_frags // 2
    n_dim_pairs = n_dim_frags // 2
    assert n_dim_frags % 2 == 0, "the head-dim buckets are multiples of 16"
    zero, neg_inf = float32(0.0), float32(-math.inf)

    @inline
    def add_product(a, words, acc, g, t):
        """``acc += A B``: A ``[16, 8 n_frags]`` from the accumulator fragments ``a`` rounded to the 16-bit
        type (an accumulator pair of two adjacent tiles is an A register of a 16-deep step), B
        ``[8 n_frags, 8 n_dim_frags]`` row-major in shared memory as ``uint32`` ``words`` (rows 16-byte
        aligned), read transposed by ``ldmatrix``, two 8-column tiles at a time."""
        lane = g * 4 + t
        for step in range(n_steps):
            a0 = pack(a[2 * step, 0], a[2 * step, 1])
            a1 = pack(a[2 * step, 2], a[2 * step, 3])
            a2 = pack(a[2 * step + 1, 0], a[2 * step + 1, 1])
            a3 = pack(a[2 * step + 1, 2], a[2 * step + 1, 3])
            row = step * 16 + (lane & 15)
            for pair in range(n_dim_pairs):
                b0, b1, b2, b3 = ldmatrix_x4_trans(words, row, (2 * pair + (lane >> 4)) * 4)
                n = 2 * pair
                acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3] = mma(a0, a1, a2, a3, b0, b1,
                                                                 acc[n, 0], acc[n, 1], acc[n, 2], acc[n, 3])
                acc[n + 1, 0], acc[n + 1, 1], acc[n + 1, 2], acc[n + 1, 3] = mma(
                    a0, a1, a2, a3, b2, b3, acc[n + 1, 0], acc[n + 1, 1], acc[n + 1, 2], acc[n + 1, 3])

    @inline
    def two_products(x, y, x_w, y_w, base, row_a, row_b, limit, n_words, scale, s, dp, g, t):
        """``s = scale X Bᵀ`` and ``dp = Y Cᵀ``, the backward's two score products: A fragments from rows
        ``row_a``/``row_b`` of the global ``x`` and ``y`` (:func:`q_word`), B from the shared words
        ``x_w[8 n + g]`` and ``y_w``, over the head dimension."""
        for n in range(n_frags):
            c0, c1, c2, c3 = zero, zero, zero, zero
            d0, d1, d2, d3 = zero, zero, zero, zero
            for kk in range(n_dim_steps):
                c0, c1, c2, c3 = mma(q_word(x, base, row_a, row_b, limit, n_words, kk, 0, t),
                                     q_word(x, base, row_a, row_b, limit, n_words, kk, 1, t),
                                     q_word(x, base, row_a, row_b, limit, n_words, kk, 2, t),
                                     q_word(x, base, row_a, row_b, limit, n_words, kk, 3, t),
                                     x_w[n * 8 + g, kk * 8 + t], x_w[n * 8 + g, kk * 8 + t + 4], c0, c1, c2, c3)
                d0, d1, d2, d3 = mma(q_word(y, base, row_a, row_b, limit, n_words, kk, 0, t),
                                     q_word(y, base, row_a, row_b, limit, n_words, kk, 1, t),
                                     q_word(y, base, row_a, row_b, limit, n_words, kk, 2, t),
                                     q_word(y, base, row_a, row_b, limit, n_words, kk, 3, t),
                                     y_w[n * 8 + g, kk * 8 + t], y_w[n * 8 + g, kk * 8 + t + 4], d0, d1, d2, d3)
            s[n, 0], s[n, 1], s[n, 2], s[n, 3] = c0 * scale, c1 * scale, c2 * scale, c3 * scale
            dp[n, 0], dp[n, 1], dp[n, 2], dp[n, 3] = d0, d1, d2, d3

    @inline
    def row_maxima(s, max_a, max_b):
        """The running maxima of rows a and b over the scores ``s``, across the four lanes of a row."""
        top_a, top_b = max_a, max_b
        for n in range(n_frags):
            top_a = max(top_a, max(s[n, 0], s[n, 1]))
            top_b = max(top_b, max(s[n, 2], s[n, 3]))
        top_a = max(top_a, _mma.shfl_xor(top_a, 1))
        top_a = max(top_a, _mma.shfl_xor(top_a, 2))
        top_b = max(top_b, _mma.shfl_xor(top_b, 1))
        top_b = max(top_b, _mma.shfl_xor(top_b, 2))
        return top_a, top_b

    @inline
    def exponentiate(s, top_a, top_b, kept, drop_scale):
        """``s = exp(s - top)`` in place; returns this lane's sums of rows a and b.  With ``drop_scale > 0``
        the elements whose bit ``4 n + e`` of ``kept`` is clear are dropped after the sum (lse keeps every
        key) and the others scaled."""
        part_a, part_b = zero, zero
        for n in range(n_frags):
            for e in range(4):
                top = top_a if e < 2 else top_b
                p = zero
                if top != neg_inf:
                    p = math.exp(s[n, e] - top)
                if e < 2:
                    part_a += p
                else:
                    part_b += p
                if drop_scale > zero:
                    p = p * drop_scale if (kept >> uint32(n * 4 + e)) & uint32(1) else zero
                s[n, e] = p
        return part_a, part_b

    @inline
    def rescale(o, alpha_a, alpha_b):
        """Rows a and b of the output fragments times their online-softmax factors."""
        for n in range(n_dim_frags):
            o[n, 0] *= alpha_a
            o[n, 1] *= alpha_a
            o[n, 2] *= alpha_b
            o[n, 3] *= alpha_b

    @inline
    def lane_sums(sum_a, sum_b):
        """The row sums over the four lanes of a row."""
        sum_a += _mma.shfl_xor(sum_a, 1)
        sum_a += _mma.shfl_xor(sum_a, 2)
        sum_b += _mma.shfl_xor(sum_b, 1)
        sum_b += _mma.shfl_xor(sum_b, 2)
        return sum_a, sum_b

    online_rescale = tile_math(float32).online_rescale
    one = float32(1.0)

    @inline
    def softmax_step(s, o, words, max_a, max_b, top_a, top_b, sum_a, sum_b, kept, drop_scale, g, t):
        """One key tile of the forward's online softmax on the score fragments ``s``, given the new row
        maxima ``top`` (:func:`row_maxima`): the probabilities (dropout with ``kept``), the running sums and
        the output fragments ``o`` rescaled, then ``o += P V`` (V row-major in the shared ``words``).
        Returns the new sums.  (The caller takes the maxima first: drawing the dropout bits after them, not
        before, keeps the forward at D = 128 on sm_80 free of spills.)"""
        alpha_a = online_rescale(max_a, top_a)
        alpha_b = online_rescale(max_b, top_b)
        part_a, part_b = exponentiate(s, top_a, top_b, kept, drop_scale)
        rescale(o, alpha_a, alpha_b)
        add_product(s, words, o, g, t)
        return sum_a * alpha_a + part_a, sum_b * alpha_b + part_b

    @inline
    def final_sums(sum_a, sum_b):
        """The rows' sums over their four lanes and their inverses (0 for a row that saw no key)."""
        sum_a, sum_b = lane_sums(sum_a, sum_b)
        return sum_a, sum_b, (one / sum_a if sum_a > zero else zero), (one / sum_b if sum_b > zero else zero)

    return SimpleNamespace(add_product=add_product, two_products=two_products, row_maxima=row_maxima,
                           softmax_step=softmax_step, final_sums=final_sums)


def row_steps(extra, keep, n_frags):
    """The element-wise steps of the kernels whose warps own query rows (the forward and dQ), inlined.

    Fragment element ``(n, e)`` of a lane ``(g, t)`` is row ``row_a`` (``e < 2``) or ``row_b``, key
    ``j0 + 8 n + 2 t + (e & 1)``.  One small loop each: a loop whose body is large is not unrolled, and
    the fragments it indexes would then go to local memory.
    """
    t_ = tile_math(float32)
    key_range, softcap_score, alibi_bias = t_.key_range, t_.softcap_score, t_.alibi_bias
    zero, neg_inf = float32(0.0), float32(-math.inf)

    @inline
    def biased(s, x, row_a, row_b, j0, t, sq, sq_d, sk, wl, wr, softcap, slope, has_alibi, b, h, bias, bs,
               has_bias, mask, ms, has_mask):
        """``s`` softcapped in place; ``x = s`` plus ALiBi and bias, -inf where the key is masked or outside
        the row's causal/window range (``x`` may be ``s``).  Row ``i`` sits at key ``i + sk - sq_d``."""
        if softcap > zero:
            for n in range(n_frags):
                for e in range(4):
                    s[n, e] = softcap_score(s[n, e], softcap)
        for n in range(n_frags):
            for e in range(4):
                x[n, e] = s[n, e]
        if has_alibi:
            for n in range(n_frags):
                for e in range(4):
                    x[n, e] += alibi_bias(slope, row_a if e < 2 else row_b, j0 + n * 8 + 2 * t + (e & 1), sq_d, sk)
        lo_a, hi_a = key_range(row_a, sq_d, sk, wl, wr)
        lo_b, hi_b = key_range(row_b, sq_d, sk, wl, wr)
        for n in range(n_frags):
            for e in range(4):
                i = row_a if e < 2 else row_b
                lo = lo_a if e < 2 else lo_b
                hi = hi_a if e < 2 else hi_b
                j = j0 + n * 8 + 2 * t + (e & 1)
                if not (i < sq and lo <= j and j < hi):
                    x[n, e] = neg_inf
                elif has_bias or has_mask:
                    x[n, e] = extra(x[n, e], b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)

    @inline
    def kept_bits(row_a, row_b, j0, t, b, h, drop):
        """Dropout's keep bits of the lane's elements, bit ``4 n + e`` (Philox, in a loop of its own)."""
        kept = uint32(0)
        for n in range(n_frags):
            for e in range(4):
                if keep(drop[0], drop[1], uint64(b) + drop[3], h, row_a if e < 2 else row_b,
                        j0 + n * 8 + 2 * t + (e & 1), drop[2]):
                    kept |= uint32(1) << uint32(n * 4 + e)
        return kept

    return SimpleNamespace(biased=biased, kept_bits=kept_bits)


def make_forward(kind, db, extra, keep, warps=WARPS):
    """The forward kernel for 16-bit inputs of ``kind`` ("f16" or "bf16") and head-dim bucket ``db``, in
    blocks of ``warps`` warps (``16 * warps`` query rows).

    ``extra`` and ``keep`` are the SIMT forward's bias/mask and dropout helpers; the arguments are the
    SIMT forward's with q, k, v and out as ``uint32`` ``[rows, D / 2]`` views.
    """
    mma, pack = _mma.ops(kind)
    block_rows, threads = 16 * warps, 32 * warps
    t_ = tile_math(float32)
    key_range, finish_lse = t_.key_range, t_.finish_lse
    bn = block_keys(db)
    n_key_frags = bn // 8
    n_dim_steps, n_dim_frags = db // 16, db // 8
    steps = fragment_steps(kind, n_key_frags, n_dim_frags)
    row_maxima, softmax_step, final_sums = steps.row_maxima, steps.softmax_step, steps.final_sums
    rows_ = row_steps(extra, keep, n_key_frags)
    biased, kept_bits = rows_.biased, rows_.kept_bits
    words = db // 2
    stage = row_stager(bn, words, threads)
    stride = words + 4  # padded: the 8 rows x 4 words of a B-fragment or ldmatrix load fall in 32 banks
    hold_q = db <= 32  # the query fragments stay in registers (past 32 the scores and outputs need them)
    zero, neg_inf = float32(0.0), float32(-math.inf)
    u0 = uint32(0)

    def forward(q, k, v, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, shift, softcap, slopes, slope_stride,
                has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, out, lse):
        n_tiles = udiv(sq + block_rows - 1, block_rows)
        tile = n_tiles - 1 - umod(cuda.blockIdx.x, n_tiles)
        bh = udiv(cuda.blockIdx.x, n_tiles)
        b = udiv(bh, heads_q)
        h = bh - b * heads_q
        q0 = bh * sq
        k0 = (b * heads_kv + udiv(h, udiv(heads_q, heads_kv))) * sk
        tid = cuda.threadIdx.x
        warp = tid >> 5
        g = (tid & 31) >> 2
        t = tid & 3
        n_words = dim >> 1
        i0 = tile * block_rows
        n_rows = min(block_rows, sq - i0)
        sq_d = sq - shift
        row_a = i0 + warp * 16 + g  # this lane's two rows
        row_b = row_a + 8
        k_s = cuda.shared.array((bn, stride), uint32)
        v_s = cuda.shared.array((bn, stride), uint32, alignment=ALIGN)
        qf = cuda.local.array((n_dim_steps if hold_q else 1, 4), uint32)
        s = cuda.local.array((n_key_frags, 4), float32)
        o = cuda.local.array((n_dim_frags, 4), float32)
        if hold_q:
            for kk in range(n_dim_steps):
                for r in range(4):
                    qf[kk, r] = q_word(q, q0, row_a, row_b, sq, n_words, kk, r, t)
        for n in range(n_dim_frags):
            for e in range(4):
                o[n, e] = zero
        max_a, max_b = neg_inf, neg_inf
        sum_a, sum_b = zero, zero
        slope = slopes[b * slope_stride + h] if has_alibi else zero
        j_lo = key_range(i0, sq_d, sk, wl, wr)[0]
        j_hi = key_range(i0 + n_rows - 1, sq_d, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, bn):
            cuda.syncthreads()  # the previous tile's values are read
            stage(k, v, k_s, v_s, k0, j0, j_hi, n_words, tid)
            cuda.syncthreads()
            for n in range(n_key_frags):  # S = Q K^T, 8 keys at a time
                c0, c1, c2, c3 = zero, zero, zero, zero
                for kk in range(n_dim_steps):
                    if hold_q:
                        a0, a1, a2, a3 = qf[kk, 0], qf[kk, 1], qf[kk, 2], qf[kk, 3]
                    else:  # no registers for Q: its fragments come again, from L1
                        a0 = q_word(q, q0, row_a, row_b, sq, n_words, kk, 0, t)
                        a1 = q_word(q, q0, row_a, row_b, sq, n_words, kk, 1, t)
                        a2 = q_word(q, q0, row_a, row_b, sq, n_words, kk, 2, t)
                        a3 = q_word(q, q0, row_a, row_b, sq, n_words, kk, 3, t)
                    c0, c1, c2, c3 = mma(a0, a1, a2, a3, k_s[n * 8 + g, kk * 8 + t], k_s[n * 8 + g, kk * 8 + t + 4],
                                         c0, c1, c2, c3)
                s[n, 0], s[n, 1], s[n, 2], s[n, 3] = c0 * scale, c1 * scale, c2 * scale, c3 * scale
            biased(s, s, row_a, row_b, j0, t, sq, sq_d, sk, wl, wr, softcap, slope, has_alibi, b, h, bias, bs,
                   has_bias, mask, ms, has_mask)
            top_a, top_b = row_maxima(s, max_a, max_b)
            kept = kept_bits(row_a, row_b, j0, t, b, h, drop) if drop_scale > zero else u0
            sum_a, sum_b = softmax_step(s, o, v_s, max_a, max_b, top_a, top_b, sum_a, sum_b, kept, drop_scale, g,
                                        t)  # and O += P V
            max_a, max_b = top_a, top_b
        sum_a, sum_b, inv_a, inv_b = final_sums(sum_a, sum_b)
        for n in range(n_dim_frags):
            w = n * 4 + t
            if w < n_words:
                if row_a < sq:
                    out[uint64(q0 + row_a), uint64(w)] = pack(o[n, 0] * inv_a, o[n, 1] * inv_a)
                if row_b < sq:
                    out[uint64(q0 + row_b), uint64(w)] = pack(o[n, 2] * inv_b, o[n, 3] * inv_b)
        if t == 0:
            if row_a < sq:
                lse[uint64(q0 + row_a)] = finish_lse(max_a, sum_a)
            if row_b < sq:
                lse[uint64(q0 + row_b)] = finish_lse(max_b, sum_b)

    return forward


def signature():
    """The argument types of :func:`make_forward`'s kernel (C-contiguous arrays)."""
    from numba import boolean, int32, int64, types

    w2, a1 = uint32[:, ::1], float32[::1]
    strides = types.UniTuple(int64, 4)
    extra = (a1, strides, boolean, boolean[::1], strides, boolean, uint64[::1], float32)
    return (w2, w2, w2, *(int32,) * 5, float32, int32, int32, int32, float32, a1, int32, boolean, *extra, w2, a1)



def make_dq(kind, db, extra, keep, warps=WARPS):
    """The backward's dQ kernel on tensor cores: the SIMT dQ kernel's arguments with dout, q, k, v and dq
    as ``uint32`` views.

    A warp owns 16 query rows as in :func:`make_forward` and walks the visible keys ``BN`` at a time:
    ``S = Q Kᵀ`` and ``dP = dO Vᵀ`` on ``mma`` (keys and values staged as words), ``P = exp(S - lse)``
    and ``dS = P (dP - delta)`` element by element on the fragments (with the softcap derivative,
    ALiBi, bias/mask, dropout and the bias gradient's atomics, as the SIMT kernel), then
    ``dQ += dS K`` with dS rounded to the inputs' 16-bit type (K's B fragments by ``ldmatrix .trans``).
    """
    mma, pack = _mma.ops(kind)
    block_rows, threads = 16 * warps, 32 * warps
    t_ = tile_math(float32)
    key_range, softcap_grad = t_.key_range, t_.softcap_grad
    bn = block_keys(db)
    n_key_frags = bn // 8
    n_dim_steps, n_dim_frags = db // 16, db // 8
    steps = fragment_steps(kind, n_key_frags, n_dim_frags, n_dim_steps)
    add_product, two_products = steps.add_product, steps.two_products
    rows_ = row_steps(extra, keep, n_key_frags)
    biased, kept_bits = rows_.biased, rows_.kept_bits
    words = db // 2
    stage = row_stager(bn, words, threads)
    stride = words + 4
    zero, neg_inf = float32(0.0), float32(-math.inf)

    def dq_kernel(dout, q, k, v, lse, delta, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, softcap, slopes,
                  slope_stride, has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, dbias, dbs,
                  want_dbias, dq):
        n_tiles = udiv(sq + block_rows - 1, block_rows)
        tile = n_tiles - 1 - umod(cuda.blockIdx.x, n_tiles)
        bh = udiv(cuda.blockIdx.x, n_tiles)
        b = udiv(bh, heads_q)
        h = bh - b * heads_q
        q0 = bh * sq
        k0 = (b * heads_kv + udiv(h, udiv(heads_q, heads_kv))) * sk
        tid = cuda.threadIdx.x
        g = (tid & 31) >> 2
        t = tid & 3
        n_words = dim >> 1
        i0 = tile * block_rows
        n_rows = min(block_rows, sq - i0)
        row_a = i0 + (tid >> 5) * 16 + g
        row_b = row_a + 8
        k_w = cuda.shared.array((bn, stride), uint32, alignment=ALIGN)
        v_w = cuda.shared.array((bn, stride), uint32)
        s = cuda.local.array((n_key_frags, 4), float32)
        dp = cuda.local.array((n_key_frags, 4), float32)
        p = cuda.local.array((n_key_frags, 4), float32)
        acc = cuda.local.array((n_dim_frags, 4), float32)
        for n in range(n_dim_frags):
            for e in range(4):
                acc[n, e] = zero
        lse_a = lse[uint64(q0 + row_a)] if row_a < sq else neg_inf
        lse_b = lse[uint64(q0 + row_b)] if row_b < sq else neg_inf
        delta_a = delta[uint64(q0 + row_a)] if row_a < sq else zero
        delta_b = delta[uint64(q0 + row_b)] if row_b < sq else zero
        slope = slopes[b * slope_stride + h] if has_alibi else zero
        j_lo = key_range(i0, sq, sk, wl, wr)[0]
        j_hi = key_range(i0 + n_rows - 1, sq, sk, wl, wr)[1]
        for j0 in range(j_lo, j_hi, bn):
            cuda.syncthreads()
            stage(k, v, k_w, v_w, k0, j0, j_hi, n_words, tid)
            cuda.syncthreads()
            # S = Q K^T and dP = dO V^T
            two_products(q, dout, k_w, v_w, q0, row_a, row_b, sq, n_words, scale, s, dp, g, t)
            # element by element: s becomes the softcapped score, p the biased one
            biased(s, p, row_a, row_b, j0, t, sq, sq, sk, wl, wr, softcap, slope, has_alibi, b, h, bias, bs,
                   has_bias, mask, ms, has_mask)
            for n in range(n_key_frags):
                for e in range(4):
                    top = lse_a if e < 2 else lse_b
                    x = zero
                    if top != neg_inf and p[n, e] != neg_inf:
                        x = math.exp(p[n, e] - top)
                    p[n, e] = x
            if drop_scale > zero:
                kept = kept_bits(row_a, row_b, j0, t, b, h, drop)
                for n in range(n_key_frags):
                    for e in range(4):
                        dp[n, e] = dp[n, e] * drop_scale if (kept >> uint32(n * 4 + e)) & uint32(1) else zero
            for n in range(n_key_frags):  # dS = P (dP - delta), before the softcap derivative
                for e in range(4):
                    dp[n, e] = p[n, e] * (dp[n, e] - (delta_a if e < 2 else delta_b))
            if want_dbias:  # the gradient of the scores after softcap; broadcast axes meet here
                for n in range(n_key_frags):
                    for e in range(4):
                        i = row_a if e < 2 else row_b
                        j = j0 + n * 8 + 2 * t + (e & 1)
                        if i < sq and j < j_hi and p[n, e] != zero:
                            cuda.atomic.add(dbias, uint64(b * dbs[0] + h * dbs[1] + i * dbs[2] + j * dbs[3]),
                                            dp[n, e])
            if softcap > zero:
                for n in range(n_key_frags):
                    for e in range(4):
                        dp[n, e] *= softcap_grad(s[n, e], softcap)
            add_product(dp, k_w, acc, g, t)  # dQ += dS K
        for n in range(n_dim_frags):
            w = n * 4 + t
            if w < n_words:
                if row_a < sq:
                    dq[uint64(q0 + row_a), uint64(w)] = pack(acc[n, 0] * scale, acc[n, 1] * scale)
                if row_b < sq:
                    dq[uint64(q0 + row_b), uint64(w)] = pack(acc[n, 2] * scale, acc[n, 3] * scale)

    return dq_kernel


def _backward_signature():
    """The argument types the dQ and dK/dV kernels share (dout, q, k, v ... dropout), and the strides type."""
    from numba import boolean, int64, types

    w2, a1 = uint32[:, ::1], float32[::1]
    strides = types.UniTuple(int64, 4)
    extra = (a1, strides, boolean, boolean[::1], strides, boolean, uint64[::1], float32)
    return (w2, w2, w2, w2, a1, a1, *(int32,) * 5, float32, int32, int32, float32, a1, int32, boolean,
            *extra), strides


def dq_signature():
    """The argument types of :func:`make_dq`'s kernel (C-contiguous arrays)."""
    from numba import boolean

    shared, strides = _backward_signature()
    return (*shared, float32[::1], strides, boolean, uint32[:, ::1])


def block_queries(db):
    """Query rows per step of the dK/dV kernel: 32, or 16 past D = 64 (two accumulators of D / 2 a lane)."""
    return 32 if db <= 64 else 16


def make_dkdv(kind, db, extra, keep, warps=WARPS):
    """The backward's dK/dV kernel on tensor cores: the SIMT dK/dV kernel's arguments with dout, q, k, v,
    dk and dv as ``uint32`` views.

    A block owns ``16 * warps`` keys of one KV head, a warp 16 of them (its A fragments, read from L1),
    and walks the query rows of every head of the group that see them, ``BM`` at a time (staged in
    shared memory as words, with their lse and delta): ``Sᵀ = K Qᵀ`` and ``dPᵀ = V dOᵀ`` on
    ``mma``, ``Pᵀ`` and ``dSᵀ`` element by element, then ``dV += Pᵀ dO`` and ``dK += dSᵀ Q`` with the
    probabilities and dS rounded to the inputs' 16-bit type.
    """
    mma, pack = _mma.ops(kind)
    block_keys_, threads = 16 * warps, 32 * warps
    t_ = tile_math(float32)
    key_range, query_range = t_.key_range, t_.query_range
    softcap_score, softcap_grad, alibi_bias = t_.softcap_score, t_.softcap_grad, t_.alibi_bias
    bm = block_queries(db)
    n_q_frags = bm // 8
    n_dim_steps, n_dim_frags = db // 16, db // 8
    steps = fragment_steps(kind, n_q_frags, n_dim_frags, n_dim_steps)
    add_product, two_products = steps.add_product, steps.two_products
    words = db // 2
    stage = row_stager(bm, words, threads)
    stride = words + 4
    zero, neg_inf = float32(0.0), float32(-math.inf)
    u0 = uint32(0)

    def dkdv_kernel(dout, q, k, v, lse, delta, heads_q, heads_kv, sq, sk, dim, scale, wl, wr, softcap, slopes,
                    slope_stride, has_alibi, bias, bs, has_bias, mask, ms, has_mask, drop, drop_scale, dk, dv):
        group = udiv(heads_q, heads_kv)
        n_tiles = udiv(sk + block_keys_ - 1, block_keys_)
        tile = umod(cuda.blockIdx.x, n_tiles)
        bh = udiv(cuda.blockIdx.x, n_tiles)  # b * heads_kv + KV head
        b = udiv(bh, heads_kv)
        k0 = bh * sk
        tid = cuda.threadIdx.x
        g = (tid & 31) >> 2
        t = tid & 3
        n_words = dim >> 1
        j0 = tile * block_keys_
        n_keys = min(block_keys_, sk - j0)
        key_a = j0 + (tid >> 5) * 16 + g  # this lane's two keys
        key_b = key_a + 8
        q_w = cuda.shared.array((bm, stride), uint32, alignment=ALIGN)
        o_w = cuda.shared.array((bm, stride), uint32, alignment=ALIGN)
        lse_s = cuda.shared.array(bm, float32)
        delta_s = cuda.shared.array(bm, float32)
        s = cuda.local.array((n_q_frags, 4), float32)
        dp = cuda.local.array((n_q_frags, 4), float32)
        p = cuda.local.array((n_q_frags, 4), float32)
        gk = cuda.local.array((n_dim_frags, 4), float32)
        gv = cuda.local.array((n_dim_frags, 4), float32)
        for n in range(n_dim_frags):
            for e in range(4):
                gk[n, e] = zero
                gv[n, e] = zero
        i_lo, i_hi = query_range(j0, j0 + n_keys, sq, sk, wl, wr)
        hk = bh - b * heads_kv
        for h in range(hk * group, (hk + 1) * group):
            slope = slopes[b * slope_stride + h] if has_alibi else zero
            q0 = (b * heads_q + h) * sq
            for i0 in range(i_lo, i_hi, bm):
                cuda.syncthreads()  # the previous step's rows are read
                stage(q, dout, q_w, o_w, q0, i0, i_hi, n_words, tid)
                e = tid
                while e < bm:
                    lse_s[e] = lse[uint64(q0 + i0 + e)] if i0 + e < i_hi else neg_inf
                    delta_s[e] = delta[uint64(q0 + i0 + e)] if i0 + e < i_hi else zero
                    e += threads
                cuda.syncthreads()
                # S^T = K Q^T and dP^T = V dO^T
                two_products(k, v, q_w, o_w, k0, key_a, key_b, sk, n_words, scale, s, dp, g, t)
                # element (n, e): key key_a (e < 2) or key_b, query row i0 + 8 n + 2 t + (e & 1)
                if softcap > zero:
                    for n in range(n_q_frags):
                        for e in range(4):
                            s[n, e] = softcap_score(s[n, e], softcap)
                for n in range(n_q_frags):
                    for e in range(4):
                        p[n, e] = s[n, e]
                if has_alibi:
                    for n in range(n_q_frags):
                        for e in range(4):
                            p[n, e] += alibi_bias(slope, i0 + n * 8 + 2 * t + (e & 1), key_a if e < 2 else key_b,
                                                  sq, sk)
                for n in range(n_q_frags):
                    for e in range(4):
                        i = i0 + n * 8 + 2 * t + (e & 1)
                        j = key_a if e < 2 else key_b
                        lo, hi = key_range(i, sq, sk, wl, wr)
                        if not (i < i_hi and j < sk and lo <= j and j < hi):
                            p[n, e] = neg_inf
                        elif has_bias or has_mask:
                            p[n, e] = extra(p[n, e], b, h, i, j, bias, bs, has_bias, mask, ms, has_mask)
                for n in range(n_q_frags):
                    for e in range(4):
                        top = lse_s[n * 8 + 2 * t + (e & 1)]
                        x = zero
                        if top != neg_inf and p[n, e] != neg_inf:
                            x = math.exp(p[n, e] - top)
                        p[n, e] = x
                kept = u0
                if drop_scale > zero:
                    for n in range(n_q_frags):
                        for e in range(4):
                            i = i0 + n * 8 + 2 * t + (e & 1)
                            j = key_a if e < 2 else key_b
                            if keep(drop[0], drop[1], uint64(b) + drop[3], h, i, j, drop[2]):
                                kept |= uint32(1) << uint32(n * 4 + e)
                    for n in range(n_q_frags):
                        for e in range(4):
                            dp[n, e] = dp[n, e] * drop_scale if (kept >> uint32(n * 4 + e)) & uint32(1) else zero
                for n in range(n_q_frags):  # dS^T = P^T (dP^T - delta), then the softcap derivative
                    for e in range(4):
                        dp[n, e] = p[n, e] * (dp[n, e] - delta_s[n * 8 + 2 * t + (e & 1)])
                if softcap > zero:
                    for n in range(n_q_frags):
                        for e in range(4):
                            dp[n, e] *= softcap_grad(s[n, e], softcap)
                if drop_scale > zero:  # dV takes the dropped probabilities
                    for n in range(n_q_frags):
                        for e in range(4):
                            p[n, e] = p[n, e] * drop_scale if (kept >> uint32(n * 4 + e)) & uint32(1) else zero
                add_product(p, o_w, gv, g, t)  # dV += P^T dO
                add_product(dp, q_w, gk, g, t)  # dK += dS^T Q
        for n in range(n_dim_frags):
            w = n * 4 + t
            if w < n_words:
                if key_a < sk:
                    dk[uint64(k0 + key_a), uint64(w)] = pack(gk[n, 0] * scale, gk[n, 1] * scale)
                    dv[uint64(k0 + key_a), uint64(w)] = pack(gv[n, 0], gv[n, 1])
                if key_b < sk:
                    dk[uint64(k0 + key_b), uint64(w)] = pack(gk[n, 2] * scale, gk[n, 3] * scale)
                    dv[uint64(k0 + key_b), uint64(w)] = pack(gv[n, 2], gv[n, 3])

    return dkdv_kernel


def dkdv_signature():
    """The argument types of :func:`make_dkdv`'s kernel (C-contiguous arrays)."""
    return (*_backward_signature()[0], uint32[:, ::1], uint32[:, ::1])


def make_paged_prefill(kind, db, warps=WARPS):
    """The paged forward (chunked prefill, ``Sq > 1``) on tensor cores, for a cache of the queries' 16-bit
    type: the SIMT paged forward's arguments, with q and the caches as ``uint32`` views.

    The query heads of a KV group are stacked as rows (head-major: row ``r`` is position ``r % Sq`` of
    head ``r // Sq`` of the group), ``16 * warps`` rows a block, for one (sequence, KV head, key split);
    keys and values are gathered through the block table into shared memory, and each split's rows are
    written normalised with their lse to the float32 partial arrays that the merge kernel combines.
    """
    mma, pack = _mma.ops(kind)
    block_rows, threads = 16 * warps, 32 * warps
    t_ = tile_math(float32)
    key_range, softcap_score, alibi_bias = t_.key_range, t_.softcap_score, t_.alibi_bias
    finish_lse = t_.finish_lse
    bn = 16  # the stacked rows' indices take registers too: the fewest scores a lane can hold
    n_key_frags = bn // 8
    n_dim_steps, n_dim_frags = db // 16, db // 8
    steps = fragment_steps(kind, n_key_frags, n_dim_frags)
    row_maxima, softmax_step, final_sums = steps.row_maxima, steps.softmax_step, steps.final_sums
    words = db // 2
    stride = words + 4
    zero, neg_inf = float32(0.0), float32(-math.inf)
    u0 = uint32(0)

    def prefill(q, k_cache, v_cache, table, lens, batch, heads_q, heads_kv, sq, dim, block_size, q_mult,
                k_scale, v_scale, has_scales, wl, wr, softcap, slopes, slope_stride, has_alibi, n_split,
                vector, out_part, lse_part):
        group = udiv(heads_q, heads_kv)
        n_stacked = group * sq
        split = umod(cuda.blockIdx.x, n_split)
        rest = udiv(cuda.blockIdx.x, n_split)
        bh = umod(rest, batch * heads_kv)
        tile = udiv(rest, batch * heads_kv)
        b = udiv(bh, heads_kv)
        hk = bh - b * heads_kv
        tid = cuda.threadIdx.x
        g = (tid & 31) >> 2
        t = tid & 3
        n_words = dim >> 1
        sk = lens[b]
        r0 = tile * block_rows
        r1 = min(r0 + block_rows, n_stacked) - 1
        i_first, i_last = umod(r0, sq), umod(r1, sq)
        if udiv(r0, sq) != udiv(r1, sq):  # the tile spans two heads: every position may be in it
            i_first, i_last = 0, sq - 1
        # this lane's two stacked rows; their positions, heads and output rows are derived where they are
        # needed rather than kept (at D = 128 the output fragments leave few registers)
        stacked_a = int32(r0 + (tid >> 5) * 16 + g)
        stacked_b = stacked_a + 8
        q_s = cuda.shared.array((block_rows, stride), uint32)  # the block's stacked query rows, once
        k_s = cuda.shared.array((bn, stride), uint32)
        v_s = cuda.shared.array((bn, stride), uint32, alignment=ALIGN)
        token = cuda.shared.array(bn, int64)
        s = cuda.local.array((n_key_frags, 4), float32)
        o = cuda.local.array((n_dim_frags, 4), float32)
        e = tid
        while e < block_rows * words:
            r = udiv(e, words)
            w = e - r * words
            x = u0
            if r0 + r < n_stacked and w < n_words:
                hq = hk * group + udiv(r0 + r, sq)
                x = q[uint64((b * heads_q + hq) * sq + umod(r0 + r, sq)), uint64(w)]
            q_s[r, w] = x
            e += threads
        for n in range(n_dim_frags):
            for e in range(4):
                o[n, e] = zero
        max_a, max_b = neg_inf, neg_inf
        sum_a, sum_b = zero, zero
        chunk = udiv(sk + n_split - 1, n_split)
        j_lo = max(key_range(i_first, sq, sk, wl, wr)[0], split * chunk)
        j_hi = min(key_range(i_last, sq, sk, wl, wr)[1], (split + 1) * chunk)
        for j0 in range(j_lo, j_hi, bn):
            cuda.syncthreads()
            e = tid
            while e < bn:
                tok = j0 + e
                row = int64(-1)
                if tok < j_hi:
                    row = (table[b, udiv(tok, block_size)] * block_size + umod(tok, block_size)) * heads_kv + hk
                token[e] = row
                e += threads
            cuda.syncthreads()
            e = tid
            while e < bn * words:
                r = udiv(e, words)
                w = e - r * words
                kx, vx = u0, u0
                if token[r] >= 0 and w < n_words:
                    kx = k_cache[uint64(token[r]), uint64(w)]
                    vx = v_cache[uint64(token[r]), uint64(w)]
                k_s[r, w] = kx
                v_s[r, w] = vx
                e += threads
            cuda.syncthreads()
            for n in range(n_key_frags):  # S = Q K^T, 8 keys at a time
                c0, c1, c2, c3 = zero, zero, zero, zero
                ra = (tid >> 5) * 16 + g
                for kk in range(n_dim_steps):
                    c0, c1, c2, c3 = mma(q_s[ra, kk * 8 + t], q_s[ra + 8, kk * 8 + t], q_s[ra, kk * 8 + t + 4],
                                         q_s[ra + 8, kk * 8 + t + 4], k_s[n * 8 + g, kk * 8 + t],
                                         k_s[n * 8 + g, kk * 8 + t + 4], c0, c1, c2, c3)
                s[n, 0], s[n, 1], s[n, 2], s[n, 3] = c0 * q_mult, c1 * q_mult, c2 * q_mult, c3 * q_mult
            if softcap > zero:
                for n in range(n_key_frags):
                    for e in range(4):
                        s[n, e] = softcap_score(s[n, e], softcap)
            i_a, i_b = umod(stacked_a, sq), umod(stacked_b, sq)
            if has_alibi:
                slope_a = slopes[b * slope_stride + hk * group + udiv(stacked_a, sq)] if stacked_a < n_stacked else zero
                slope_b = slopes[b * slope_stride + hk * group + udiv(stacked_b, sq)] if stacked_b < n_stacked else zero
                for n in range(n_key_frags):
                    for e in range(4):
                        j = j0 + n * 8 + 2 * t + (e & 1)
                        if e < 2:
                            s[n, e] += alibi_bias(slope_a, i_a, j, sq, sk)
                        else:
                            s[n, e] += alibi_bias(slope_b, i_b, j, sq, sk)
            lo_a, hi_a = key_range(i_a, sq, sk, wl, wr)
            lo_b, hi_b = key_range(i_b, sq, sk, wl, wr)
            for n in range(n_key_frags):
                for e in range(4):
                    live = stacked_a < n_stacked if e < 2 else stacked_b < n_stacked
                    lo = lo_a if e < 2 else lo_b
                    hi = hi_a if e < 2 else hi_b
                    j = j0 + n * 8 + 2 * t + (e & 1)
                    if not (live and lo <= j and j < hi and j < j_hi):
                        s[n, e] = neg_inf
            top_a, top_b = row_maxima(s, max_a, max_b)
            sum_a, sum_b = softmax_step(s, o, v_s, max_a, max_b, top_a, top_b, sum_a, sum_b, u0, zero, g, t)
            max_a, max_b = top_a, top_b
        sum_a, sum_b, inv_a, inv_b = final_sums(sum_a, sum_b)
        base = split * batch * heads_q * sq
        live_a, live_b = stacked_a < n_stacked, stacked_b < n_stacked
        row_a = (b * heads_q + hk * group + udiv(stacked_a, sq)) * sq + umod(stacked_a, sq)  # the output rows
        row_b = (b * heads_q + hk * group + udiv(stacked_b, sq)) * sq + umod(stacked_b, sq)
        for n in range(n_dim_frags):
            d = n * 8 + 2 * t
            if d < dim:
                if live_a:
                    out_part[uint64(base + row_a), uint64(d)] = o[n, 0] * inv_a
                    out_part[uint64(base + row_a), uint64(d + 1)] = o[n, 1] * inv_a
                if live_b:
                    out_part[uint64(base + row_b), uint64(d)] = o[n, 2] * inv_b
                    out_part[uint64(base + row_b), uint64(d + 1)] = o[n, 3] * inv_b
        if t == 0:
            if live_a:
                lse_part[uint64(base + row_a)] = finish_lse(max_a, sum_a)
            if live_b:
                lse_part[uint64(base + row_b)] = finish_lse(max_b, sum_b)

    return prefill


def paged_signature():
    """The argument types of :func:`make_paged_prefill`'s kernel (C-contiguous arrays)."""
    from numba import boolean, int32

    w2, a1, i = uint32[:, ::1], float32[::1], int32
    return (w2, w2, w2, int32[:, ::1], int32[::1], i, i, i, i, i, i, float32, a1, a1, boolean, i, i, float32, a1, i,
            boolean, i, boolean, float32[:, ::1], a1)
