"""The one place that knows what a device is.

NumPy arrays go to :mod:`fastattn.cpu`; anything exposing
``__cuda_array_interface__`` (numba device arrays, CuPy, PyTorch CUDA tensors),
or a simulator array under ``NUMBA_ENABLE_CUDASIM=1``, goes to
:mod:`fastattn.cuda`.  Both packages expose the same module names.
"""
import importlib

import numpy as np
from numba import config


def is_cuda_array(x):
    """True for CUDA device arrays (and the CUDA simulator's fake ones)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    if config.ENABLE_CUDASIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return isinstance(x, FakeCUDAArray)
    return False


def device_of(x):
    """'cuda' or 'cpu' for an array argument."""
    return "cuda" if is_cuda_array(x) else "cpu"


def backend_of(**arrays):
    """Return the kernel package (cpu or cuda) for the named arrays.

    ``None`` values are ignored.  Mixed devices raise ``TypeError`` naming
    every argument and its device.
    """
    devices = {name: device_of(a) for name, a in arrays.items() if a is not None}
    kinds = set(devices.values())
    if len(kinds) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise TypeError(f"arrays must all be NumPy arrays or all CUDA device arrays, got {listing}")
    kind = kinds.pop() if kinds else "cpu"
    return importlib.import_module(f"fastattn.{kind}")


def as_array(name, x):
    """NumPy and numba device arrays as they are; other CUDA arrays adopted zero-copy.

    Objects exposing ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors)
    become numba device arrays sharing their memory, so validation sees NumPy
    dtypes.  Lists and scalars go through ``np.asarray``.
    """
    if isinstance(x, np.ndarray) or hasattr(x, "copy_to_host"):
        return x
    if is_cuda_array(x):
        from numba import cuda

        return cuda.as_cuda_array(x)
    if isinstance(x, (list, tuple, int, float, np.generic)):
        return np.asarray(x)
    raise TypeError(f"{name}: expected a NumPy array or a CUDA device array, got {type(x).__name__}")
