"""Register-blocked tile products shared by the dense CUDA kernels (the twin of cpu/_tiles.py).

A block of ``ny x nx`` threads works on a score tile of ``tm * ny`` rows and
``tn * nx`` columns.  Thread ``(ty, tx)`` owns rows ``ty * tm + r`` and
columns ``tx + nx * c``: its ``tm x tn`` scores stay in registers, and each
value it reads from shared memory feeds ``tm`` or ``tn`` multiply-adds.

- :func:`scores <pieces>` forms ``A B^T`` for a row tile of A and a row tile of
  B, both staged through shared memory in chunks of 32 features;
- :func:`accumulate <pieces>` adds ``P C`` to the thread's slice of an output
  (``tm`` rows, columns ``tx + nx * u`` of the head dimension: a
  ``tm x (D / nx)`` register array), staging the rows of C in chunks of
  ``vr`` whole rows.  The output's index never depends on a chunk, only on
  loops of constant trip count, so it never leaves registers.

Every shared array has one padding column, so a warp reading a column of many
rows hits distinct banks.  :func:`pieces` builds the helpers of one kernel
specialisation (tile shape, bucketed head dimension ``db``, element codec);
they are inlined into it.
"""
from types import SimpleNamespace

from numba import cuda, uint64

from ._device import inline, udiv, umod

#: Head dimensions the kernels are specialised for; others are padded up to the next one.
HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
#: Bytes of shared memory for one chunk of whole rows (``vr`` rows of ``D`` values).
ROW_CHUNK_BYTES = 8704


def bucket(head_dim):
    """The smallest specialised head dimension that holds ``head_dim``."""
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"q: expected head dimension D <= {HEAD_DIMS[-1]} on CUDA, got {head_dim}")


def row_chunk(db, itemsize):
    """Rows per chunk of whole rows: as many as fit in :data:`ROW_CHUNK_BYTES`, at most 16."""
    return max(1, min(16, ROW_CHUNK_BYTES // ((db + 1) * itemsize)))


def pieces(load, acc, db, tm, tn, ny, nx):
    """The staging and product helpers of one specialisation (see the module docstring)."""
    rows, cols, threads = tm * ny, tn * nx, ny * nx
    dk = min(32, db)
    per_thread = db // nx
    vr = row_chunk(db, 8 if acc.bitwidth == 64 else 4)
    zero = acc(0.0)

    @inline
    def stage(src, r0, n, d0, dim, mult, dst, count, width):
        """``dst[r, d] = load(src[r0 + r, d0 + d]) * mult`` for ``count`` rows of ``width``; zero past ``n`` or ``dim``.

        The loop steps by ``blockDim.x``, a value the compiler cannot see: it stays
        a plain loop instead of being unrolled into many loads in flight, which
        would cost registers the product loops need.  A ``while`` loop, since a
        ``range`` with a runtime step divides (in 64 bits) for its trip count.
        """
        e = cuda.threadIdx.x
        while e < count * width:  # a while loop: no trip-count division
            r = udiv(e, width)
            d = e - r * width
            x = zero
            if r < n and d0 + d < dim:
                x = load(src[uint64(r0 + r), uint64(d0 + d)]) * mult
            dst[r, d] = x
            e += cuda.blockDim.x

    @inline
    def scores(a_src, a0, na, a_mult, b_src, b0, nb, b_mult, dim, a_chunk, b_chunk, s):
        """``s[r, c] = sum_d A[a0 + ty*tm + r, d] * B[b0 + tx + nx*c, d]`` (rows past ``na``/``nb`` read 0).

        ``A = load(a_src) * a_mult`` and ``B`` likewise, rows of 2-d ``[rows, D]`` arrays.
        """
        tx = umod(cuda.threadIdx.x, nx)
        ty = udiv(cuda.threadIdx.x, nx)
        a = cuda.local.array(tm, acc)
        w = cuda.local.array(tn, acc)
        for r in range(tm):
            for c in range(tn):
                s[r, c] = zero
        for d0 in range(0, dim, dk):
            cuda.syncthreads()
            stage(a_src, a0, na, d0, dim, a_mult, a_chunk, rows, dk)
            stage(b_src, b0, nb, d0, dim, b_mult, b_chunk, cols, dk)
            cuda.syncthreads()
            for d in range(min(dk, dim - d0)):  # a runtime trip count: the loop stays a loop
                for r in range(tm):
                    a[r] = a_chunk[ty * tm + r, d]
                for c in range(tn):
                    w[c] = b_chunk[tx + nx * c, d]
                for r in range(tm):
                    for c in range(tn):
                        s[r, c] += a[r] * w[c]

    @inline
    def accumulate(p, src, r0, n, dim, mult, row_buf, out):
        """``out[r, u] += sum_c p[ty*tm + r, c] * C[r0 + c, tx + nx*u]`` over ``n`` rows of C.

        ``C = load(src) * mult`` (a 2-d ``[rows, D]`` array), staged ``vr`` whole rows at a time.  Starts
        with a barrier, so ``p`` may have been written just before.
        """
        tx = umod(cuda.threadIdx.x, nx)
        ty = udiv(cuda.threadIdx.x, nx)
        a = cuda.local.array(tm, acc)
        w = cuda.local.array(per_thread, acc)
        for c0 in range(0, n, vr):
            m = min(vr, n - c0)
            cuda.syncthreads()
            stage(src, r0 + c0, m, 0, dim, mult, row_buf, vr, db)
            cuda.syncthreads()
            for c in range(m):
                for r in range(tm):
                    a[r] = p[ty * tm + r, c0 + c]
                for u in range(per_thread):
                    w[u] = row_buf[c, tx + nx * u]
                for r in range(tm):
                    for u in range(per_thread):
                        out[r, u] += a[r] * w[u]

    @inline
    def clear(out):
        for r in range(tm):
            for u in range(per_thread):
                out[r, u] = zero

    return SimpleNamespace(scores=scores, accumulate=accumulate, clear=clear, rows=rows,
                           cols=cols, threads=threads, per_thread=per_thread, dk=dk, vr=vr)

