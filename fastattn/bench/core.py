"""What every section of ``python -m fastattn bench`` shares: dtypes by name, device copies,
the timers (best of, in turn), the machine's sgemm and tile-GEMM rates, whether CUDA rows can run, and printing.

Nothing here imports another module of :mod:`fastattn.bench`.
"""
import time

import ml_dtypes
import numpy as np
from numba import njit, prange

import fastattn
from ..cpu._gemm import add_matmul, matmul_nt, pack_transposed, simd_gemm


def numpy_dtype(name):
    """The dtype of a case's name: NumPy's, or ml_dtypes' bfloat16 / fp8 formats."""
    return np.dtype(getattr(ml_dtypes, name) if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else name)


def to_device(a):
    """Copy a host array to the GPU; float16/bfloat16 travel as their uint16 bits."""
    from numba import cuda

    bits = fastattn._dtypes.bits_view(np.ascontiguousarray(a))
    dev = cuda.to_device(bits)
    return dev if bits.dtype == a.dtype else dev.view(a.dtype)


def peer_dtype(dtype):
    """What the NumPy peer computes in: float32 for float16 and bfloat16 inputs (NumPy has no BLAS for
    float16 and no bfloat16 arithmetic, so a NumPy user converts), else the inputs' own dtype."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.name in ("float16", "bfloat16") else dtype


def as_peer(*arrays):
    """The arrays converted to :func:`peer_dtype` (no copy when they already are)."""
    return [a.astype(peer_dtype(a.dtype), copy=False) for a in arrays]


def best_time(fn, repeats, budget_s=float("inf"), sync=None):
    """Best wall time of up to ``repeats`` calls, stopping early once ``budget_s`` is spent."""
    times = []
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def sgemm_gflops(n, repeats=5):
    """This machine's float32 GEMM rate through NumPy's BLAS (all its threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), np.float32)
    b = rng.standard_normal((n, n), np.float32)
    a @ b
    return 2.0 * n ** 3 / best_time(lambda: a @ b, repeats) / 1e9


@njit(parallel=True, cache=True)
def _tile_gemms(q, k, v, s, o, panels, calls, simd):
    for t in prange(q.shape[0]):
        scratch = np.empty_like(o[t])
        for _ in range(calls):
            pack_transposed(k[t], panels[t], simd)
            matmul_nt(q[t], k[t], panels[t], s[t], simd)
            add_matmul(s[t], v[t], o[t], scratch, simd)


def tile_gemm_gflops(rows=256, keys=512, dim=64, calls=20, repeats=5):
    """The rate of the CPU forward's two tile products (``S = Q Kᵀ`` and ``O += S V``: ``rows x keys`` by
    ``dim``, the default tiles at D = 64) as the forward runs them, softmax left out: in a numba
    ``prange``, one task a thread, on fastattn's micro-kernels or single-threaded BLAS
    (:func:`fastattn.cpu._gemm.simd_gemm`).  The ceiling of the float32 forward."""
    from numba import get_num_threads

    from ..cpu._blas import single_threaded_blas

    n = get_num_threads()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, rows, dim), np.float32)
    k, v = (rng.standard_normal((n, keys, dim), np.float32) for _ in range(2))
    s, o = np.empty((n, rows, keys), np.float32), np.zeros((n, rows, dim), np.float32)
    panels = np.empty((n, keys * dim), np.float32)
    simd = simd_gemm()
    with single_threaded_blas():
        _tile_gemms(q, k, v, s, o, panels, 1, simd)
        seconds = best_time(lambda: _tile_gemms(q, k, v, s, o, panels, calls, simd), repeats)
    return n * calls * 2 * 2.0 * rows * keys * dim / seconds / 1e9


def cuda_status():
    """(usable, reason): CUDA rows need a real GPU; the simulator's timings mean nothing."""
    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        return False, "CUDA rows skipped: the CUDA simulator is enabled (timings would be meaningless)"
    try:
        if cuda.is_available():
            return True, ""
    except Exception:
        pass
    return False, "CUDA rows skipped: no CUDA GPU found"


def cuda_sync():
    from numba import cuda

    cuda.synchronize()


class CUDAOnly:
    """asv mixin: the same benchmark on device arrays; skipped (NotImplementedError in setup)
    unless a real GPU is present."""

    backend = "cuda"

    def setup(self, *params):
        usable, reason = cuda_status()
        if not usable:
            raise NotImplementedError(reason)
        super().setup(*params)


def say(stream, text, end=""):
    stream.write(text + end)
    stream.flush()


def interleaved(fns, repeats, pause=0.0):
    """Best time of each callable, calling them in turn ``repeats`` times.

    ``pause`` seconds of sleep before each call let the previous callable's idle
    threads stop spinning (OpenBLAS's spin for about 0.1 s after a call, and on a
    small machine they take the cores from the next callable's threads).
    """
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def align(head, body, right_from):
    """A plain-text table: ``head`` and the ``body`` rows (tuples of strings) in aligned columns, a rule
    under the head, columns from ``right_from`` on right-aligned (the numbers)."""
    widths = [max(len(row[c]) for row in (head, *body)) for c in range(len(head))]

    def line(row):
        return "  ".join(cell.rjust(w) if c >= right_from else cell.ljust(w)
                         for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])
