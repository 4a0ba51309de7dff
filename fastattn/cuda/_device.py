"""Device-side pieces every CUDA kernel uses: inlining, typed tile math, element codecs.

Inlined helpers.  Every device function here is compiled with
``inline="always"``: numba splices it into the caller's IR before typing, so a
helper is never compiled on its own.  That keeps per-thread arrays in
registers across the call, and it lets ``numba.cuda.compile_ptx(kernel, sig,
cc=...)`` build any kernel for a named compute capability on a machine with no
GPU (numba-cuda compiles stand-alone device functions for the *current*
device, which such a machine does not have).

Codecs.  A kernel is compiled for one input format; it reads an element with
``load`` and writes one with ``store`` (see :func:`codec`), all in the
accumulation type (float32, or float64 for float64 inputs):

- float16 arrays are read and written as float16: ``cvt.f32.f16`` and
  ``cvt.rn.f16.f32``, the hardware conversions;
- bfloat16 travels as its uint16 bits: widening is the 16-bit shift that
  ``__bfloat162float`` is in hardware; narrowing rounds to nearest even on the
  bits, as ``cuda_bf16.hpp`` does (``cvt.rn.bf16.f32`` needs sm_80, and only
  the epilogue pays for it);
- fp8 bytes (``float8_e4m3fn``, ``float8_e5m2``) are decoded by moving their
  exponent and mantissa bits into a float32 (subnormals by one multiply) and
  encoded with a round-to-nearest-even on the float32 bits, saturating: no
  table, so a warp's loads never serialise.

The CUDA simulator has no bodies for libdevice's bit casts; only those two
functions (:func:`as_float32`, :func:`bits_of`) have a simulator fallback.
"""
import math

import numpy as np
from numba import config, cuda, float32, float64, int32, uint8, uint16, uint32
from numba.types import float16

from .. import _tile
from .._dtypes import BF16, E4M3, E5M2, F16, NATIVE


def kernel(fn, launch_bounds=None):
    """``cuda.jit(fn)``, with ``launch_bounds=(threads, min_blocks)`` where given (the simulator has none)."""
    if launch_bounds is None or config.ENABLE_CUDASIM:
        return cuda.jit(fn)
    return cuda.jit(fn, launch_bounds=launch_bounds)


def inline(fn):
    """Make ``fn`` a device function that numba inlines into its callers."""
    return cuda.jit(device=True, inline="always")(fn)


#: Tile math (:mod:`fastattn._tile`) with float32 and float64 constants.
TILE32 = _tile.build(float32, inline)
TILE64 = _tile.build(float64, inline)


def tile_math(acc):
    return TILE64 if acc == float64 else TILE32


if config.ENABLE_CUDASIM:  # the simulator runs kernels as Python: NumPy views stand in for the casts
    def as_float32(bits):
        return np.uint32(bits).view(np.float32)

    def bits_of(x):
        return np.uint32(np.float32(x).view(np.uint32))
else:
    from numba.cuda import libdevice

    @inline
    def as_float32(bits):
        """The float32 whose bits are ``bits`` (``mov.b32``)."""
        return libdevice.int_as_float(int32(bits))

    @inline
    def bits_of(x):
        """The bits of float32 ``x`` as uint32."""
        return uint32(libdevice.float_as_int(x))


@inline
def load_f32(x):
    return float32(x)


@inline
def load_f64(x):
    return float64(x)


@inline
def load_f16(x):
    return float32(x)


@inline
def load_bf16(bits):
    return as_float32(uint32(bits) << uint32(16))


@inline
def load_e4m3(bits):
    """float8_e4m3fn: bias 7, no infinities, 0x7f / 0xff are NaN."""
    em = uint32(bits) & uint32(0x7F)
    if em >= uint32(8):  # normal: exponent and mantissa move up, the bias grows by 127 - 7
        mag = as_float32((em << uint32(20)) + uint32(120 << 23))
    else:  # subnormal: mantissa * 2**-9
        mag = float32(em) * float32(2.0 ** -9)
    if em == uint32(0x7F):
        mag = float32(math.nan)
    return -mag if uint32(bits) & uint32(0x80) else mag


@inline
def load_e5m2(bits):
    """float8_e5m2: bias 15, with infinities (exponent 31)."""
    em = uint32(bits) & uint32(0x7F)
    if em >= uint32(4):
        mag = as_float32((em << uint32(21)) + uint32(112 << 23))
    else:
        mag = float32(em) * float32(2.0 ** -16)
    if em >= uint32(0x7C):
        mag = float32(math.inf) if em == uint32(0x7C) else float32(math.nan)
    return -mag if uint32(bits) & uint32(0x80) else mag


@inline
def store_f32(x):
    return float32(x)


@inline
def store_f64(x):
    return float64(x)


@inline
def store_f16(x):
    return float16(x)


@inline
def store_bf16(x):
    u = bits_of(x)
    if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000):  # NaN stays a (quiet) NaN
        return uint16((u >> uint32(16)) | uint32(0x40))
    u += uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1))
    return uint16(u >> uint32(16))


@inline
def _encode_fp8(x, mbits, bias, max_bits, nan_bits):
    """Round float32 ``x`` to the nearest even fp8 value, saturating at ``max_bits``."""
    u = bits_of(x)
    sign = (u >> uint32(24)) & uint32(0x80)
    a = u & uint32(0x7FFFFFFF)
    if a > uint32(0x7F800000):
        return uint8(nan_bits)
    shift = uint32(23 - mbits)
    e = int32(a >> uint32(23)) - int32(127)
    if e >= int32(1 - bias):  # normal in fp8: round the mantissa, then rebias the exponent
        r = (a + (uint32(1) << (shift - uint32(1))) - uint32(1) + ((a >> shift) & uint32(1))) >> shift
        r -= uint32((127 - bias) << mbits)
    else:  # subnormal in fp8 (or zero): shift the full significand further
        s = uint32(int32(shift) + int32(1 - bias) - e)
        r = uint32(0)
        if (a >> uint32(23)) != uint32(0) and s <= uint32(24):
            mant = (a & uint32(0x7FFFFF)) | uint32(0x800000)
            r = (mant + (uint32(1) << (s - uint32(1))) - uint32(1) + ((mant >> s) & uint32(1))) >> s
    if r > uint32(max_bits):
        r = uint32(max_bits)
    return uint8(r | sign)


@inline
def store_e4m3(x):
    return _encode_fp8(float32(x), 3, 7, 0x7E, 0x7F)


@inline
def store_e5m2(x):
    return _encode_fp8(float32(x), 2, 15, 0x7B, 0x7E)


_LOADS = {NATIVE: load_f32, F16: load_f16, BF16: load_bf16, E4M3: load_e4m3, E5M2: load_e5m2}
_STORES = {NATIVE: store_f32, F16: store_f16, BF16: store_bf16, E4M3: store_e4m3, E5M2: store_e5m2}


def codec(dtype):
    """``(load, store)`` device functions for elements of ``dtype`` (a NumPy/ml_dtypes dtype)."""
    from .._dtypes import codec_of

    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return load_f64, store_f64
    c = codec_of(dtype)
    return _LOADS[c], _STORES[c]


def acc_type(dtype):
    """The numba accumulation type of an input dtype: float64 for float64, else float32."""
    return float64 if np.dtype(dtype) == np.float64 else float32


def element_type(dtype):
    """The numba type of what a kernel reads for ``dtype``: float16 as itself, bf16 as uint16, fp8 as uint8."""
    dtype = np.dtype(dtype)
    if dtype.itemsize == 1:
        return uint8
    if dtype.itemsize == 2:
        return float16 if dtype == np.float16 else uint16
    return float64 if dtype == np.float64 else float32
