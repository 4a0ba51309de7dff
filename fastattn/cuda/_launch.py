"""Device-array plumbing shared by the CUDA kernels: adoption, allocation, grids."""
from dataclasses import dataclass

import numpy as np
from numba import cuda

from .._dtypes import bits_view, codec_of


def kernel_view(x):
    """What a kernel reads: float32/float64/float16 arrays as they are, bf16 as uint16, fp8 as uint8 bits."""
    if codec_of(x.dtype) == 0 or np.dtype(x.dtype) == np.float16:
        return x
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8)


def empty(shape, dtype):
    """A device array of a supported dtype (bf16 allocated as uint16 and viewed)."""
    dtype = np.dtype(dtype)
    if codec_of(dtype) == 0:
        return cuda.device_array(shape, dtype)
    return cuda.device_array(shape, bits_view(np.empty(0, dtype)).dtype).view(dtype)


@cuda.jit
def _copy4(src, dst, accumulate):
    """``dst = src`` (``accumulate``: ``dst += src``) for 4-d arrays of one shape, any strides."""
    e = cuda.grid(1)
    shape = dst.shape
    if e < dst.size:
        d = e % shape[3]
        s = (e // shape[3]) % shape[2]
        h = (e // (shape[3] * shape[2])) % shape[1]
        b = e // (shape[3] * shape[2] * shape[1])
        if accumulate:
            dst[b, h, s, d] += src[b, h, s, d]
        else:
            dst[b, h, s, d] = src[b, h, s, d]


def contiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy made on the device (4-d arrays)."""
    if x.is_c_contiguous():
        return x
    dst = cuda.device_array(tuple(x.shape), x.dtype)
    if dst.size:
        _copy4[blocks(dst.size, 256), 256](x, dst, False)
    return dst


def rows(x):
    """A 4-d ``[B, H, S, D]`` device array as the 2-d ``[B*H*S, D]`` view the dense kernels index."""
    x = contiguous(kernel_view(x))
    shape = tuple(x.shape)
    return x.reshape(int(np.prod(shape[:-1])), shape[-1])


def words(*arrays):
    """The 2-d ``[rows, D]`` 16-bit device arrays as ``uint32`` ``[rows, D / 2]`` views (two values a word), or
    None when one does not start on a 4-byte boundary (a view at an odd offset: the word loads would fault)."""
    if any(_address(x) % 4 for x in arrays):
        return None
    return [x.view(np.uint32) for x in arrays]


def _address(x):
    """Where a device array's first element lives (the simulator's arrays: the host memory it wraps)."""
    interface = getattr(x, "__cuda_array_interface__", None)
    if interface is None:
        interface = np.asarray(x).__array_interface__  # a simulated device array wraps a NumPy array
    return interface["data"][0]


def flat(x):
    """A C-contiguous device array as 1-d."""
    return x.reshape(int(np.prod(tuple(x.shape))))


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
    A report for a compute capability below ``min_cc`` leaves the variant out;
    a variant with ``link`` sources is reported from its LTO-linked PTX.
    The merge kernels' ``dtype`` is that of the partial states they read.
    """

    kernel: str
    role: str
    dtype: str
    head_dim: int
    block_threads: int
    py_func: object
    signature: tuple
    launch_bounds: tuple = None  #: ``(threads, min_blocks)`` given to ``cuda.jit``, if any
    min_cc: tuple = None  #: the oldest compute capability the kernel is built for (tensor cores: 8.0), if any
    link: tuple = ()  #: CUDA C++ sources linked into the kernel with LTO (its PTX is then nvJitLink's)
