"""Keep BLAS single-threaded while a parallel kernel calls it from every core.

Numba's ``np.dot`` goes through SciPy's BLAS.  Inside a ``prange`` each core
already runs its own GEMM, so BLAS's own threads would only oversubscribe.
:func:`single_threaded_blas` sets SciPy's BLAS to one thread when a kernel
starts (with threadpoolctl) and leaves it there: putting the user's setting
back after every call, as an earlier version did, woke OpenBLAS's threads each
time, and kernels called from a Python thread other than the first caller (as
dask's threaded scheduler does) then ran 2-3x slower.  Only the BLAS that
numba uses (SciPy's) is touched, never NumPy's.
"""
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_libs = None


def _numba_blas():
    global _libs
    if _libs is None:
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library numba calls)
        from threadpoolctl import ThreadpoolController

        ctl = ThreadpoolController()
        _libs = [lib for lib in ctl.lib_controllers
                 if lib.user_api == "blas" and "scipy" in lib.filepath and "numpy" not in lib.filepath]
    return _libs


@contextmanager
def single_threaded_blas():
    """Run the body with SciPy's BLAS on one thread (and leave it on one thread)."""
    with _lock:
        for lib in _numba_blas():
            if lib.num_threads != 1:
                lib.set_num_threads(1)
    yield
