"""The register-blocked inner loops of the CPU paged decode kernel.

A decode step multiplies a few query rows (the ``m`` query rows of one KV
group) by every key and value of a sequence: about one multiply-add per byte
of cache, so the arithmetic has to run near the machine's peak to keep up with
memory.  These loops read keys and values straight from the cache rows
(converted as they are loaded, :mod:`fastattn.cpu._simd`), keep their sums in
registers, and need the head dimension to be a multiple of 16.

``rows[i] + u`` is the cache row of token ``i`` of the tile for KV head ``u``.
"""
from numba import njit

from ._fastmath import FASTMATH
from ._simd import prefetch, vfma, vload, vsplat, vstore, vsum, vzero

_INLINE = dict(fastmath=FASTMATH, inline="always")


@njit(**_INLINE)
def _dots4(qu, r, ka, kb):
    """Dot products of query rows r .. r+3 with key rows ka and kb: two groups of four sums."""
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzero()
    q0, q1, q2, q3 = qu[r], qu[r + 1], qu[r + 2], qu[r + 3]
    for d in range(0, q0.size, 8):
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
    return (vsum(a0), vsum(a1), vsum(a2), vsum(a3)), (vsum(b0), vsum(b1), vsum(b2), vsum(b3))


@njit(**_INLINE)
def _dots1(qrow, ka, kb):
    a = b = vzero()
    for d in range(0, qrow.size, 8):
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
            sa, sb = _dots4(qu, r, ka, kb)
            for t in range(4):
                s[r + t, ia] = sa[t]
                s[r + t, ib] = sb[t]
            r += 4
        for r in range(r, m):
            sa1, sb1 = _dots1(qu[r], ka, kb)
            s[r, ia] = sa1
            s[r, ib] = sb1


@njit(fastmath=FASTMATH, cache=True)
def add_values(acc, p, v_rows, rows, u, n):
    """``acc += p[:, :n] @ v[:n]``: 16 columns of four accumulator rows stay in registers over all n keys."""
    m, dim = acc.shape
    r = 0
    while r + 4 <= m:
        p0, p1, p2, p3 = p[r], p[r + 1], p[r + 2], p[r + 3]
        o0, o1, o2, o3 = acc[r], acc[r + 1], acc[r + 2], acc[r + 3]
        for d in range(0, dim, 16):
            a0, b0 = vload(o0, d), vload(o0, d + 8)
            a1, b1 = vload(o1, d), vload(o1, d + 8)
            a2, b2 = vload(o2, d), vload(o2, d + 8)
            a3, b3 = vload(o3, d), vload(o3, d + 8)
            for i in range(n):
                row = v_rows[rows[i] + u]
                x = vload(row, d)
                y = vload(row, d + 8)
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
            vstore(o0, d + 8, b0)
            vstore(o1, d, a1)
            vstore(o1, d + 8, b1)
            vstore(o2, d, a2)
            vstore(o2, d + 8, b2)
            vstore(o3, d, a3)
            vstore(o3, d + 8, b3)
        r += 4
    for r in range(r, m):
        p0, o0 = p[r], acc[r]
        for d in range(0, dim, 16):
            a0, b0 = vload(o0, d), vload(o0, d + 8)
            for i in range(n):
                row = v_rows[rows[i] + u]
                w = vsplat(p0[i])
                a0 = vfma(w, vload(row, d), a0)
                b0 = vfma(w, vload(row, d + 8), b0)
            vstore(o0, d, a0)
            vstore(o0, d + 8, b0)
