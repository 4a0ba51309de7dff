"""Device-array plumbing shared by the CUDA kernels: adoption, allocation, grids."""
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .._dtypes import bits_view, codec_of


def kernel_view(x):
    """What a kernel reads: float arrays as they are, f16/bf16 as their uint16 bits."""
    return x if codec_of(x.dtype) == 0 else x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8)


def empty(shape, dtype):
    """A device array of a supported dtype (bf16 allocated as uint16 and viewed)."""
    dtype = np.dtype(dtype)
    if codec_of(dtype) == 0:
        return cuda.device_array(shape, dtype)
    return cuda.device_array(shape, bits_view(np.empty(0, dtype)).dtype).view(dtype)


def to_device(x):
    return cuda.to_device(np.ascontiguousarray(x))


def blocks(n, per_block):
    return max(1, -(-n // per_block))


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a CUDA kernel, as ``cuda-report`` lists it.

    ``py_func`` and ``signature`` are what ``numba.cuda.compile_ptx`` takes;
    ``dtype`` is the NumPy/ml_dtypes name of the inputs (the cache's for paged
    kernels), ``role`` one of ``forward``, ``decode``, ``backward``, ``other``.
    """

    kernel: str
    role: str
    dtype: str
    head_dim: int
    block_threads: int
    py_func: object
    signature: tuple
