"""The register-blocked inner loops of the CPU paged decode kernel.

A decode step multiplies a few query rows (the ``m`` query rows of one KV
group) by every key and value of a sequence: about one multiply-add per byte
of cache, so the arithmetic has to run near the machine's peak to keep up with
memory.  These loops read keys and values straight from the cache rows
(converted as they are loaded, :mod:`fastattn.cpu._simd`), keep sixteen sums
in registers, and need the head dimension to be a multiple of ``LANES`` (16).

``starts[i]`` is the offset (in elements) of token ``i``'s row of the tile:
``Hkv * D`` elements, KV head ``u`` at ``starts[i] + u * D``.  Inside the
loops every array is a raw pointer (:func:`~fastattn.cpu._simd.data_of`) and
rows are offsets: an array or row view used there can cost two atomic
reference-count updates per pass.

Memory: the loops prefetch into the second-level cache (a head's rows are
``Hkv * D`` elements apart and would evict each other in the first), through
whole token rows in ``STREAMS`` streams at once (each a quarter of the tile's
tokens, front to back: a core read memory fastest with four streams), a few
lines per pass of arithmetic: :func:`scores` asks for the tile's values,
:func:`add_values` for the next tile's keys.
"""
from numba import njit

from ._fastmath import FASTMATH
from ._simd import (LANES, data_of, line_elements, prefetch_l2, vadd, vfma, vlane, vload, vload2, vsplat, vstore,
                    vstore4, vsum, vsums16, vzero)

_INLINE = dict(fastmath=FASTMATH, inline="always")


STREAMS = 4  # prefetch streams per tile: a core read memory fastest with four (docs/design.md)


@njit(**_INLINE)
def _prefetch_span(x, start, count, step):
    """Ask for the cache lines that begin in x[start : start + count], ``step`` elements to a line (second
    level cache): successive spans ask for each line once.

    A while loop: ``range`` with a step that is not a constant divides to count its passes.
    """
    end = start + count
    start = (start + step - 1) // step * step
    while start < end:
        prefetch_l2(x, start)
        start += step


@njit(**_INLINE)
def _prefetch_ahead(ahead, cursor, count):
    """Ask for the next ``count`` elements of a tile's token rows; return the moved cursor.

    ``ahead`` is (pointer, starts, row_len, n, step): the tile's n token rows
    of ``row_len`` elements start at ``starts[t]``; ``step`` elements make a
    cache line.  The rows are read as ``STREAMS`` streams, each a quarter of
    the tokens front to back, ``count / STREAMS`` elements from each per call;
    ``cursor`` is (t, offset into row t) within every stream.
    """
    x, starts, row_len, n, step = ahead
    t, off = cursor
    quarter = (n + STREAMS - 1) // STREAMS
    per = count // STREAMS
    while per > 0 and t < quarter:
        take = min(per, row_len - off)
        for j in range(STREAMS):
            if j * quarter + t < n:
                _prefetch_span(x, starts[j * quarter + t] + off, take, step)
        per -= take
        off += take
        if off == row_len:
            t += 1
            off = 0
    return t, off


@njit(**_INLINE)
def _fma16(q, dim, r, d, x0, x1, x2, x3, sums):
    """The sixteen sums of :func:`_dots16` plus columns d .. d + LANES."""
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3 = sums
    w = vload(q, r * dim + d)
    a0, a1, a2, a3 = vfma(w, x0, a0), vfma(w, x1, a1), vfma(w, x2, a2), vfma(w, x3, a3)
    w = vload(q, (r + 1) * dim + d)
    b0, b1, b2, b3 = vfma(w, x0, b0), vfma(w, x1, b1), vfma(w, x2, b2), vfma(w, x3, b3)
    w = vload(q, (r + 2) * dim + d)
    c0, c1, c2, c3 = vfma(w, x0, c0), vfma(w, x1, c1), vfma(w, x2, c2), vfma(w, x3, c3)
    w = vload(q, (r + 3) * dim + d)
    e0, e1, e2, e3 = vfma(w, x0, e0), vfma(w, x1, e1), vfma(w, x2, e2), vfma(w, x3, e3)
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3


@njit(**_INLINE)
def _dots16(q, dim, r, k, k0, k1, k2, k3, ahead, at, step):
    """Dot products of query rows r .. r+3 with the keys at offsets k0 .. k3: lane 4 t + j holds row r+t
    with key j.  Keys are loaded 2 LANES at a time (one conversion for both halves).

    Each of those passes also prefetches the next 2 LANES elements of
    ``ahead`` from each of the four offsets in ``at`` that is not negative
    (``step`` elements to a line): D elements from each, spread over the sums.
    """
    z = vzero()
    sums = (z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z)
    d = 0
    while d + 2 * LANES <= dim:
        for a in at:
            if a >= 0:
                _prefetch_span(ahead, a + d, 2 * LANES, step)
        x0, y0 = vload2(k, k0 + d)
        x1, y1 = vload2(k, k1 + d)
        x2, y2 = vload2(k, k2 + d)
        x3, y3 = vload2(k, k3 + d)
        sums = _fma16(q, dim, r, d, x0, x1, x2, x3, sums)
        sums = _fma16(q, dim, r, d + LANES, y0, y1, y2, y3, sums)
        d += 2 * LANES
    if d < dim:
        sums = _fma16(q, dim, r, d, vload(k, k0 + d), vload(k, k1 + d), vload(k, k2 + d), vload(k, k3 + d), sums)
    a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3 = sums
    return vsums16(a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, e0, e1, e2, e3)


@njit(**_INLINE)
def _stream_at(starts, n, quarter, j, t, off):
    """Where stream j of a tile's prefetches stands at (t, off); -1 past its end."""
    i = j * quarter + t
    return starts[i] + off if t < quarter and i < n else -1


@njit(**_INLINE)
def _store16(out, at, width, sums):
    """out[at + t width : at + t width + 4] = lanes 4 t .. 4 t + 3 of sums, for t < 4."""
    vstore4(out, at, sums, 0)
    vstore4(out, at + width, sums, 1)
    vstore4(out, at + 2 * width, sums, 2)
    vstore4(out, at + 3 * width, sums, 3)


@njit(**_INLINE)
def _dots2(q, dim, r, k, ka, kb):
    """Dot products of query row r with the keys at offsets ka and kb."""
    a = b = vzero()
    for d in range(0, dim, LANES):
        w = vload(q, r * dim + d)
        a = vfma(w, vload(k, ka + d), a)
        b = vfma(w, vload(k, kb + d), b)
    return vsum(a), vsum(b)


@njit(**_INLINE)
def _score_keys(q, k, out, dim, m, width, starts, u, n, c):
    """Scores of KV head u's m query rows (q rows u m ..) against keys c .. c+3 of the tile, into out
    (rows u m .. of width ``width``); a short last group repeats its last key."""
    last = min(c + 4, n) - 1
    head = u * dim
    k0 = starts[c] + head
    k1 = starts[min(c + 1, last)] + head
    k2 = starts[min(c + 2, last)] + head
    k3 = starts[last] + head
    first = u * m
    for r in range(first, first + m - m % 4, 4):
        sums = _dots16(q, dim, r, k, k0, k1, k2, k3, k, (-1, -1, -1, -1), 1)
        if last == c + 3:
            _store16(out, r * width + c, width, sums)
        else:
            for t in range(4):
                for j in range(last + 1 - c):
                    out[(r + t) * width + c + j] = vlane(sums, 4 * t + j)
    for r in range(first + m - m % 4, first + m):
        sa, sb = _dots2(q, dim, r, k, k0, k1)
        out[r * width + c] = sa
        out[r * width + min(c + 1, last)] = sb
        sa, sb = _dots2(q, dim, r, k, k2, k3)
        out[r * width + min(c + 2, last)] = sa
        out[r * width + last] = sb


@njit(fastmath=FASTMATH, cache=True)
def scores(qt, k_cache, starts, n, s, v_cache):
    """``s[u, :, i] = qt[u] @ k[i, u]`` for every KV head u and the n keys of a tile (qt [Hkv, m, D] holds
    each group's scaled queries; s is [Hkv, m, >= n]).

    Four keys at a time against four query rows (rows left over when m is not
    a multiple of 4 take one row against two keys), every head of four keys
    before the next four: the keys are read front to back.  Each group of
    four keys and one head also prefetches the next ``D`` elements of each of
    the four streams of the tile's values (:func:`_prefetch_ahead`) for
    :func:`add_values`; in the common case (one group of four rows, D a
    multiple of 2 LANES, four keys) spread over the sums, which measured
    faster with the cache in memory.
    """
    heads, m, dim = qt.shape
    width = s.shape[2]
    q, k, out = data_of(qt), data_of(k_cache), data_of(s)
    row_len, v, step = heads * dim, data_of(v_cache), line_elements(v_cache)
    values = (v, starts, row_len, n, step)
    cursor = (0, 0)
    quarter = (n + STREAMS - 1) // STREAMS
    common = n - n % 4 if m == 4 and dim % (2 * LANES) == 0 else 0
    for c in range(0, common, 4):
        k0, k1, k2, k3 = starts[c], starts[c + 1], starts[c + 2], starts[c + 3]
        for u in range(heads):
            t, off = cursor  # D elements of each stream: never across a row
            at = (_stream_at(starts, n, quarter, 0, t, off), _stream_at(starts, n, quarter, 1, t, off),
                  _stream_at(starts, n, quarter, 2, t, off), _stream_at(starts, n, quarter, 3, t, off))
            head = u * dim
            sums = _dots16(q, dim, 4 * u, k, k0 + head, k1 + head, k2 + head, k3 + head, v, at, step)
            _store16(out, 4 * u * width + c, width, sums)
            if t < quarter:
                off += dim
                cursor = (t + 1, 0) if off == row_len else (t, off)
    for c in range(common, n, 4):
        for u in range(heads):
            _score_keys(q, k, out, dim, m, width, starts, u, n, c)
            cursor = _prefetch_ahead(values, cursor, 4 * dim)


@njit(**_INLINE)
def _load4(o, at):
    """o[at : at + 4 LANES] as four vectors."""
    return vload(o, at), vload(o, at + LANES), vload(o, at + 2 * LANES), vload(o, at + 3 * LANES)


@njit(**_INLINE)
def _store4(o, at, a, b, c, e):
    """o[at : at + 4 LANES] = a, b, c, e."""
    vstore(o, at, a)
    vstore(o, at + LANES, b)
    vstore(o, at + 2 * LANES, c)
    vstore(o, at + 3 * LANES, e)


@njit(**_INLINE)
def _value_key(pp, p0, p1, p2, p3, v, at, acc):
    """The sixteen sums of :func:`_add4_wide` plus one key: value columns at ``at``, weights pp[p0..p3]."""
    a0, b0, c0, e0, a1, b1, c1, e1, a2, b2, c2, e2, a3, b3, c3, e3 = acc
    x, y = vload2(v, at)
    z, t = vload2(v, at + 2 * LANES)
    w = vsplat(pp[p0])
    a0, b0, c0, e0 = vfma(w, x, a0), vfma(w, y, b0), vfma(w, z, c0), vfma(w, t, e0)
    w = vsplat(pp[p1])
    a1, b1, c1, e1 = vfma(w, x, a1), vfma(w, y, b1), vfma(w, z, c1), vfma(w, t, e1)
    w = vsplat(pp[p2])
    a2, b2, c2, e2 = vfma(w, x, a2), vfma(w, y, b2), vfma(w, z, c2), vfma(w, t, e2)
    w = vsplat(pp[p3])
    a3, b3, c3, e3 = vfma(w, x, a3), vfma(w, y, b3), vfma(w, z, c3), vfma(w, t, e3)
    return a0, b0, c0, e0, a1, b1, c1, e1, a2, b2, c2, e2, a3, b3, c3, e3


@njit(**_INLINE)
def _add4_wide(o, dim, pp, width, r, v, starts, col, n, d, ahead, cursor):
    """Columns d .. d + 4 LANES of accumulator rows r .. r+3 (value columns ``col`` on in each token
    row): sixteen sums in registers over all n keys.

    Also prefetches 4 LANES elements of ``ahead`` per key (16 LANES every fourth key); returns the moved cursor.
    """
    o0, o1, o2, o3 = r * dim + d, (r + 1) * dim + d, (r + 2) * dim + d, (r + 3) * dim + d
    a0, b0, c0, e0 = _load4(o, o0)
    a1, b1, c1, e1 = _load4(o, o1)
    a2, b2, c2, e2 = _load4(o, o2)
    a3, b3, c3, e3 = _load4(o, o3)
    acc = (a0, b0, c0, e0, a1, b1, c1, e1, a2, b2, c2, e2, a3, b3, c3, e3)
    p0, p1, p2, p3 = r * width, (r + 1) * width, (r + 2) * width, (r + 3) * width
    for i in range(n):
        if i % 4 == 0:  # 4 LANES elements a key, asked for four keys at a time
            cursor = _prefetch_ahead(ahead, cursor, 16 * LANES)
        acc = _value_key(pp, p0 + i, p1 + i, p2 + i, p3 + i, v, starts[i] + col, acc)
    a0, b0, c0, e0, a1, b1, c1, e1, a2, b2, c2, e2, a3, b3, c3, e3 = acc
    _store4(o, o0, a0, b0, c0, e0)
    _store4(o, o1, a1, b1, c1, e1)
    _store4(o, o2, a2, b2, c2, e2)
    _store4(o, o3, a3, b3, c3, e3)
    return cursor


@njit(**_INLINE)
def _add4(o, dim, pp, width, r, v, starts, col, n, d, ahead, cursor):
    """Columns d .. d + LANES of accumulator rows r .. r+3 (the columns :func:`_add4_wide` leaves)."""
    o0, o1, o2, o3 = r * dim + d, (r + 1) * dim + d, (r + 2) * dim + d, (r + 3) * dim + d
    a0, a1, a2, a3 = vload(o, o0), vload(o, o1), vload(o, o2), vload(o, o3)
    p0, p1, p2, p3 = r * width, (r + 1) * width, (r + 2) * width, (r + 3) * width
    for i in range(n):
        cursor = _prefetch_ahead(ahead, cursor, LANES)
        x = vload(v, starts[i] + col)
        a0 = vfma(vsplat(pp[p0 + i]), x, a0)
        a1 = vfma(vsplat(pp[p1 + i]), x, a1)
        a2 = vfma(vsplat(pp[p2 + i]), x, a2)
        a3 = vfma(vsplat(pp[p3 + i]), x, a3)
    vstore(o, o0, a0)
    vstore(o, o1, a1)
    vstore(o, o2, a2)
    vstore(o, o3, a3)
    return cursor


@njit(**_INLINE)
def _add1(o, dim, pp, width, r, v, starts, col, n, d, ahead, cursor):
    """Columns d .. d + LANES of accumulator row r, four keys per pass in four independent sums."""
    a0 = vload(o, r * dim + d)
    a1 = a2 = a3 = vzero()
    p0 = r * width
    i = 0
    while i + 4 <= n:
        cursor = _prefetch_ahead(ahead, cursor, 4 * LANES)
        a0 = vfma(vsplat(pp[p0 + i]), vload(v, starts[i] + col), a0)
        a1 = vfma(vsplat(pp[p0 + i + 1]), vload(v, starts[i + 1] + col), a1)
        a2 = vfma(vsplat(pp[p0 + i + 2]), vload(v, starts[i + 2] + col), a2)
        a3 = vfma(vsplat(pp[p0 + i + 3]), vload(v, starts[i + 3] + col), a3)
        i += 4
    for i in range(i, n):
        cursor = _prefetch_ahead(ahead, cursor, LANES)
        a0 = vfma(vsplat(pp[p0 + i]), vload(v, starts[i] + col), a0)
    vstore(o, r * dim + d, vadd(vadd(a0, a1), vadd(a2, a3)))
    return cursor


@njit(fastmath=FASTMATH, cache=True)
def add_values(acc, p, v_cache, starts, u, n, ahead_cache, ahead_starts, ahead_n, heads, cursor):
    """``acc += p[:, :n] @ v[:n]`` for KV head u, with blocks of the accumulator held in registers over
    all n keys.

    The first pass over the keys also prefetches ``D`` elements per key of the
    token rows ``ahead_starts[:ahead_n]`` of ``ahead_cache`` (the next tile's
    keys, ``heads`` heads to a row), in the streams of :func:`_prefetch_ahead`
    from ``cursor``, so the calls for every head together ask for the whole
    tile.  Returns the moved cursor.
    """
    m, dim = acc.shape
    width = p.shape[1]
    o, pp, v = data_of(acc), data_of(p), data_of(v_cache)
    step = line_elements(ahead_cache)
    ahead = (data_of(ahead_cache), ahead_starts, heads * dim, ahead_n, step)
    idle = (ahead[0], ahead_starts, heads * dim, 0, step)  # the later passes prefetch nothing
    m4 = m - m % 4
    for r in range(0, m4, 4):
        d = 0
        while d + 4 * LANES <= dim:
            cursor = _add4_wide(o, dim, pp, width, r, v, starts, u * dim + d, n, d, ahead if r == 0 else idle,
                                cursor)
            d += 4 * LANES
        for d in range(d, dim, LANES):
            cursor = _add4(o, dim, pp, width, r, v, starts, u * dim + d, n, d, ahead if r == 0 else idle, cursor)
    for r in range(m4, m):
        for d in range(0, dim, LANES):
            cursor = _add1(o, dim, pp, width, r, v, starts, u * dim + d, n, d, ahead if r == 0 else idle, cursor)
    return cursor
