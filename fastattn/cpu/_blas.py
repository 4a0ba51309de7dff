"""SciPy's BLAS, the one numba's ``np.dot`` calls: loaded with the right kernels, kept on one thread.

**Kernels.** OpenBLAS picks its GEMM kernels from the CPU's family number, from
a table that lags new CPUs.  OpenBLAS 0.3.30 (SciPy's wheels) knows AMD's Zen 4
and gives it the AVX-512 kernels ("Cooperlake"/"SkylakeX"), but not Zen 5
(family 26): there it takes the AVX2 kernels ("Haswell"), and on a Zen 5 EPYC a
single-threaded float32 GEMM of the attention tiles ran at 117 GFLOP/s against
213 with the AVX-512 ones.  :func:`load_blas` therefore loads SciPy's OpenBLAS
with ``OPENBLAS_CORETYPE`` set for that one load (and put back after it) when
the CPU is an AMD Zen with the AVX-512 subset those kernels use: the choice
OpenBLAS's own table makes for Zen 4.  Nothing is hinted when the user has set
``OPENBLAS_CORETYPE`` (theirs is used), on other CPUs, or when SciPy's BLAS was
loaded before fastattn's first call (``python -m fastattn info`` says which
kernels run).  NumPy's own OpenBLAS, loaded by ``import numpy``, keeps its choice.

**Threads.** Inside a ``prange`` each core already runs its own GEMM, so BLAS's
own threads would only oversubscribe.  :func:`single_threaded_blas` sets SciPy's
BLAS to one thread when a kernel starts (with threadpoolctl) and leaves it
there: putting the user's setting back after every call, as an earlier version
did, woke OpenBLAS's threads each time, and kernels called from a Python thread
other than the first caller (as dask's threaded scheduler does) then ran 2-3x
slower.  Only the BLAS that numba uses (SciPy's) is touched, never NumPy's.
"""
import os
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_libs = None

#: The AVX-512 subset OpenBLAS's SkylakeX kernels use (LLVM's names of the features).
_SKYLAKEX_FEATURES = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def coretype_hint(cpu_name, features):
    """The ``OPENBLAS_CORETYPE`` to load SciPy's OpenBLAS with on this CPU, or None to let it choose.

    ``cpu_name`` and ``features`` are LLVM's (``znver5``, ``{"avx512f", ...}``).
    An AMD Zen with AVX-512 gets what OpenBLAS itself gives Zen 4: "Cooperlake"
    with bfloat16 dot products, else "SkylakeX" (their float32 kernels are the same).

    Examples
    --------
    >>> from fastattn.cpu._blas import coretype_hint
    >>> coretype_hint("znver5", {"avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
    'SkylakeX'
    >>> coretype_hint("znver3", {"avx2"}) is None
    True
    """
    if not cpu_name.startswith("znver") or not all(f in features for f in _SKYLAKEX_FEATURES):
        return None
    return "Cooperlake" if "avx512bf16" in features else "SkylakeX"


def _host_cpu():
    """LLVM's name and feature set of this CPU (numba compiles for the same)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten().split(",")
    return llvm.get_host_cpu_name(), {f[1:] for f in features if f.startswith("+")}


def _scipy_blas_loaded():
    """Whether SciPy's BLAS library is in the process already (its kernels are then chosen)."""
    from threadpoolctl import threadpool_info

    return any(_is_scipys(lib["filepath"]) for lib in threadpool_info() if lib["user_api"] == "blas")


def _is_scipys(path):
    return "scipy" in path and "numpy" not in path


def load_blas():
    """Import the BLAS numba calls (``scipy.linalg.cython_blas``), with the kernel hint of the module
    docstring when it applies.  Returns the hint used, or None."""
    if _scipy_blas_loaded() or "OPENBLAS_CORETYPE" in os.environ:
        import scipy.linalg.cython_blas  # noqa: F401  (already loaded, or the user's choice)
        return None
    hint = coretype_hint(*_host_cpu())
    if hint is not None:
        os.environ["OPENBLAS_CORETYPE"] = hint  # read once, when the library loads
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba calls)
    finally:
        if hint is not None:
            del os.environ["OPENBLAS_CORETYPE"]
    return hint


def _numba_blas():
    global _libs
    if _libs is None:
        load_blas()
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        _libs = [lib for lib in ctl.lib_controllers if lib.user_api == "blas" and _is_scipys(lib.filepath)]
    return _libs


def blas_kernels():
    """The kernel family ("architecture") of each BLAS numba may call, e.g. ``["SkylakeX"]``
    (empty where threadpoolctl cannot tell)."""
    with _lock:
        libs = _numba_blas()
    return [info["architecture"] for info in (lib.info() for lib in libs) if info.get("architecture")]


@contextmanager
def single_threaded_blas():
    """Run the body with SciPy's BLAS on one thread (and leave it on one thread)."""
    with _lock:
        for lib in _numba_blas():
            if lib.num_threads != 1:
                lib.set_num_threads(1)
    yield
