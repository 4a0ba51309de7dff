"""CPU kernels (numba ``@njit(parallel=True)``), one module per family."""
import os

import numba

# Concurrent calls from several Python threads need a thread-safe layer (tbb or
# omp); numba's fallback "workqueue" aborts on them.  Respect an explicit choice.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"

from . import attention, gqa, paged, projection, rotary, varlen  # noqa: E402,F401
