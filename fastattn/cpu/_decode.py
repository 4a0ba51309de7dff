"""The register-blocked inner loops of the CPU paged decode kernel.

A decode step multiplies a few query rows (the ``m`` query rows of one KV
group) by every key and value of a sequence: about one multiply-add per byte
of cache, so the arithmetic has to run near the machine's peak to keep up with
memory.  These loops read keys and values straight from the cache rows
(converted as they are loaded, :mod:`fastattn.cpu._simd`), keep their sums in
registers, and need the head dimension to be a multiple of ``LANES`` (16).

``rows[i] + u`` is the cache row of token ``i`` of the tile for KV head ``u``.
"""
from numba import njit

from ._fastmath import FASTMATH
from ._simd import LANES, prefetch, vadd, vfma, vload, vsplat, vstore, vsum, vsums8, vzero

_INLINE = dict(fastmath=FASTMATH, inline="always")


@njit(**_INLINE)
def _dots4(qu, r, ka, kb):
    """Dot products of query rows r .. r+3 with key rows ka (sums 0..3) and kb (sums 4..7)."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzero()
    q0, q1, q2, q3 = qu[r], qu[r + 1], qu[r + 2], qu[r + 3]
    for d in range(0, q0.size, LANES):
        x = vload(ka, d)
        y = vload(kb, d)
        w = vload(q0, d)
        a0 = vfma(w, x, a0)
        b0 = vfma(w, y, b0)
        w = vload(q1, d)
        a1 = vfma(w, x, a1)
        b1 = vfma(w, y, b1)
        w = vload(q2, d)
        a2 = vfma(w, x, a2)
        b2 = vfma(w, y, b2)
        w = vload(q3, d)
        a3 = vfma(w, x, a3)
        b3 = vfma(w, y, b3)
    return vsums8(a0, a1, a2, a3, b0, b1, b2, b3)


@njit(**_INLINE)
def _dots1(qrow, ka, kb):
    a = b = vzero()
    for d in range(0, qrow.size, LANES):
        w = vload(qrow, d)
        a = vfma(w, vload(ka, d), a)
        b = vfma(w, vload(kb, d), b)
    return vsum(a), vsum(b)


@njit(**_INLINE)
def prefetch_row(row):
    """Ask for every cache line of a cache row."""
    step = max(1, 64 // row.itemsize)
    for d in range(0, row.size, step):
        prefetch(row, d)


@njit(fastmath=FASTMATH, cache=True)
def scores(qu, k_rows, rows, u, n, s, v_rows):
    """``s[:, i] = qu @ k[i]`` for the n keys of a tile (qu [m, D] is the group's scaled queries).

    Keys are taken in pairs from the two halves of the tile, so two runs of
    the cache are read at once; the values of each key are prefetched for
    :func:`add_values`.
    """
    m = qu.shape[0]
    half = (n + 1) // 2
    for c in range(half):
        ia = c
        ib = min(c + half, n - 1)  # odd n: the last pair computes key ia twice
        ka = k_rows[rows[ia] + u]
        kb = k_rows[rows[ib] + u]
        prefetch_row(v_rows[rows[ia] + u])
        prefetch_row(v_rows[rows[ib] + u])
        r = 0
        while r + 4 <= m:
            sums = _dots4(qu, r, ka, kb)
            for t in range(4):
                s[r + t, ia] = sums[t]
                s[r + t, ib] = sums[4 + t]
            r += 4
        for r in range(r, m):
            sa1, sb1 = _dots1(qu[r], ka, kb)
            s[r, ia] = sa1
            s[r, ib] = sb1


@njit(**_INLINE)
def _add4_wide(o0, o1, o2, o3, p0, p1, p2, p3, v_rows, rows, u, n, d):
    """Columns d .. d + 2 LANES of four accumulator rows: eight sums in registers over all n keys."""
    a0, b0 = vload(o0, d), vload(o0, d + LANES)
    a1, b1 = vload(o1, d), vload(o1, d + LANES)
    a2, b2 = vload(o2, d), vload(o2, d + LANES)
    a3, b3 = vload(o3, d), vload(o3, d + LANES)
    for i in range(n):
        row = v_rows[rows[i] + u]
        x = vload(row, d)
        y = vload(row, d + LANES)
        w = vsplat(p0[i])
        a0 = vfma(w, x, a0)
        b0 = vfma(w, y, b0)
        w = vsplat(p1[i])
        a1 = vfma(w, x, a1)
        b1 = vfma(w, y, b1)
        w = vsplat(p2[i])
        a2 = vfma(w, x, a2)
        b2 = vfma(w, y, b2)
        w = vsplat(p3[i])
        a3 = vfma(w, x, a3)
        b3 = vfma(w, y, b3)
    vstore(o0, d, a0)
    vstore(o0, d + LANES, b0)
    vstore(o1, d, a1)
    vstore(o1, d + LANES, b1)
    vstore(o2, d, a2)
    vstore(o2, d + LANES, b2)
    vstore(o3, d, a3)
    vstore(o3, d + LANES, b3)


@njit(**_INLINE)
def _add4(o0, o1, o2, o3, p0, p1, p2, p3, v_rows, rows, u, n, d):
    """Columns d .. d + LANES of four accumulator rows (the last block when D is an odd number of LANES)."""
    a0, a1, a2, a3 = vload(o0, d), vload(o1, d), vload(o2, d), vload(o3, d)
    for i in range(n):
        x = vload(v_rows[rows[i] + u], d)
        a0 = vfma(vsplat(p0[i]), x, a0)
        a1 = vfma(vsplat(p1[i]), x, a1)
        a2 = vfma(vsplat(p2[i]), x, a2)
        a3 = vfma(vsplat(p3[i]), x, a3)
    vstore(o0, d, a0)
    vstore(o1, d, a1)
    vstore(o2, d, a2)
    vstore(o3, d, a3)


@njit(**_INLINE)
def _add1(o, prow, v_rows, rows, u, n, d):
    """Columns d .. d + LANES of one accumulator row, four keys per pass in four independent sums."""
    a0 = vload(o, d)
    a1 = a2 = a3 = vzero()
    i = 0
    while i + 4 <= n:
        a0 = vfma(vsplat(prow[i]), vload(v_rows[rows[i] + u], d), a0)
        a1 = vfma(vsplat(prow[i + 1]), vload(v_rows[rows[i + 1] + u], d), a1)
        a2 = vfma(vsplat(prow[i + 2]), vload(v_rows[rows[i + 2] + u], d), a2)
        a3 = vfma(vsplat(prow[i + 3]), vload(v_rows[rows[i + 3] + u], d), a3)
        i += 4
    for i in range(i, n):
        a0 = vfma(vsplat(prow[i]), vload(v_rows[rows[i] + u], d), a0)
    vstore(o, d, vadd(vadd(a0, a1), vadd(a2, a3)))


@njit(fastmath=FASTMATH, cache=True)
def add_values(acc, p, v_rows, rows, u, n):
    """``acc += p[:, :n] @ v[:n]``, with blocks of the accumulator held in registers over all n keys."""
    m, dim = acc.shape
    r = 0
    while r + 4 <= m:
        p0, p1, p2, p3 = p[r], p[r + 1], p[r + 2], p[r + 3]
        o0, o1, o2, o3 = acc[r], acc[r + 1], acc[r + 2], acc[r + 3]
        d = 0
        while d + 2 * LANES <= dim:
            _add4_wide(o0, o1, o2, o3, p0, p1, p2, p3, v_rows, rows, u, n, d)
            d += 2 * LANES
        if d < dim:
            _add4(o0, o1, o2, o3, p0, p1, p2, p3, v_rows, rows, u, n, d)
        r += 4
    for r in range(r, m):
        for d in range(0, dim, LANES):
            _add1(acc[r], p[r], v_rows, rows, u, n, d)
