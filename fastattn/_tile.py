"""Attention math shared by every kernel, CPU and CUDA alike.

The masks that fastattn supports (bottom-right causal and sliding windows)
all leave each query row a *contiguous* interval of visible keys, so a mask is
two integers per row and never a matrix.  The score of a visible key is
``softcap(scale * q.k) - slope * |i + Sk - Sq - j|`` and the softmax is the
online (running maximum) form.  Every kernel calls these helpers; they compile
for both targets and run as Python in the CUDA simulator.

:func:`build` makes the set for one float type: the module-level names are the
CPU's (Python floats), and the CUDA kernels build a float32 set (or float64 for
float64 inputs) whose constants carry that type, so no float64 arithmetic
creeps into a float32 kernel.
"""
import math

from types import SimpleNamespace

from numba.extending import register_jitable


def build(acc=float, decorate=register_jitable):
    """The tile helpers for float type ``acc``, each compiled with ``decorate``.

    ``acc`` is ``float`` for the CPU kernels, ``numba.float32``/``float64``
    for the CUDA ones (``decorate`` then makes inlined device functions).
    """
    ZERO, ONE, NEG_INF = acc(0.0), acc(1.0), acc(-math.inf)

    @decorate
    def key_range(i, sq, sk, window_left, window_right):
        """Visible keys ``[lo, hi)`` of query row ``i``; empty when ``lo >= hi``.

        ``window_*`` of -1 mean unbounded; causal is ``window_right == 0``.  Rows
        are aligned to the bottom right: row ``i`` sits at key ``i + sk - sq``.
        """
        diag = i + sk - sq
        lo = 0
        hi = sk
        if window_left >= 0:  # within [0, sk]: a block's diagonal may lie past its last key
            lo = min(max(lo, diag - window_left), sk)
        if window_right >= 0:
            hi = min(hi, diag + window_right + 1)
        if hi < lo:  # no visible key: an empty range inside [0, sk]
            hi = lo
        return lo, hi

    @decorate
    def softcap_score(x, softcap):
        """``softcap * tanh(x / softcap)``; identity when ``softcap == 0``."""
        if softcap > ZERO:
            return softcap * math.tanh(x / softcap)
        return x

    @decorate
    def softcap_grad(capped, softcap):
        """d softcap(x) / dx written in terms of the capped value."""
        if softcap > ZERO:
            t = capped / softcap
            return ONE - t * t
        return ONE

    @decorate
    def alibi_bias(slope, i, j, sq, sk):
        """ALiBi bias ``-slope * |i + sk - sq - j|`` (FlashAttention-2 convention)."""
        return -slope * acc(abs(i + sk - sq - j))

    @decorate
    def online_rescale(row_max, new_max):
        """Factor that moves sums taken under ``row_max`` to ``new_max`` (0 from -inf)."""
        if row_max == NEG_INF:
            return ZERO
        return math.exp(row_max - new_max)

    @decorate
    def finish_lse(row_max, row_sum):
        """Natural-log sum of exponentials of a row; -inf when the row saw no key."""
        if row_sum == ZERO:
            return NEG_INF
        return row_max + math.log(row_sum)

    @decorate
    def query_range(j0, j1, sq, sk, window_left, window_right):
        """Query rows ``[lo, hi)`` that may see some key in ``[j0, j1)`` (a superset)."""
        shift = sk - sq
        lo = 0
        hi = sq
        if window_right >= 0:
            lo = max(lo, j0 - shift - window_right)
        if window_left >= 0:
            hi = min(hi, j1 - shift + window_left)
        lo = min(lo, sq)
        if hi < lo:  # no row sees these keys: an empty range inside [0, sq]
            hi = lo
        return lo, hi

    return SimpleNamespace(key_range=key_range, softcap_score=softcap_score, softcap_grad=softcap_grad,
                           alibi_bias=alibi_bias, online_rescale=online_rescale, finish_lse=finish_lse,
                           query_range=query_range)


_cpu = build()
key_range, softcap_score, softcap_grad = _cpu.key_range, _cpu.softcap_score, _cpu.softcap_grad
alibi_bias, online_rescale, finish_lse, query_range = (_cpu.alibi_bias, _cpu.online_rescale, _cpu.finish_lse,
                                                       _cpu.query_range)
