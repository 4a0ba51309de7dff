"""Keep BLAS single-threaded while a parallel kernel calls it from every core.

Numba's ``np.dot`` goes through SciPy's BLAS.  Inside a ``prange`` each core
already runs its own GEMM, so BLAS's own threads would only oversubscribe.
The limit is reference-counted so concurrent calls from several Python threads
keep it until the last one leaves, then the user's setting comes back.  Only
the BLAS that numba uses (SciPy's) is touched, never NumPy's.
"""
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_users = 0
_saved = None
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
    global _users, _saved
    with _lock:
        if _users == 0:
            libs = _numba_blas()
            _saved = [lib.num_threads for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for lib, n in zip(_numba_blas(), _saved):
                    lib.set_num_threads(n)
