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

Vector loads.  :func:`load16` reads 16 bytes of a row (8 float16/bf16
values, 16 fp8 bytes, 4 float32) with one ``ld.global.v4``-class instruction,
the widest load a thread can issue; kernels use it where rows are 16-byte
aligned (:func:`vector_width`).

The CUDA simulator has no bodies for libdevice's bit casts or for LLVM
intrinsics; only those functions (:func:`as_float32`, :func:`bits_of`,
:func:`load16`) have a simulator fallback, and the index divisions
(:func:`udiv`, :func:`umod`) are Python's ``//`` and ``%`` there, since numba's
scalar types are slow Python callables in the simulator.
"""
import math

import numpy as np
from numba import config, cuda, float32, float64, int32, int64, uint8, uint16, uint32
from numba.types import float16

from .. import _tile
from .._dtypes import BF16, E4M3, E5M2, F16, NATIVE


def simulated():
    """Whether numba's CUDA simulator stands in for the GPU."""
    return bool(config.ENABLE_CUDASIM)


def compute_capability():
    """``(major, minor)`` of the current GPU."""
    return tuple(cuda.get_current_device().compute_capability)


def kernel(fn, launch_bounds=None, lto=False):
    """``cuda.jit(fn)``, with ``launch_bounds=(threads, min_blocks)`` where given, and with link-time
    optimisation where ``lto`` (kernels that call the CUDA C++ of :mod:`fastattn.cuda._mma`, whose calls
    then inline); the simulator takes neither."""
    if config.ENABLE_CUDASIM:
        return cuda.jit(fn)
    options = {"lto": True} if lto else {}
    if launch_bounds is not None:
        options["launch_bounds"] = launch_bounds
    return cuda.jit(fn, **options)


def inline(fn):
    """Make ``fn`` a device function that numba inlines into its callers."""
    return cuda.jit(device=True, inline="always")(fn)


if config.ENABLE_CUDASIM:  # numba's scalar types are slow Python callables under the simulator
    def udiv(a, b):
        return a // b

    def umod(a, b):
        return a % b
else:
    @inline
    def udiv(a, b):
        """``a // b`` for indices ``0 <= a, b < 2**32``, as one 32-bit unsigned division (an int64).

        Python's ``//`` on numba's int64 is a 64-bit floor division: a long instruction
        sequence on the GPU and many registers; indices never need it.
        """
        return int64(uint32(a) // uint32(b))

    @inline
    def umod(a, b):
        """``a % b`` for indices ``0 <= a, b < 2**32`` (see :func:`udiv`)."""
        return int64(uint32(a) % uint32(b))


#: Tile math (:mod:`fastattn._tile`) with float32 and float64 constants.
TILE32 = _tile.build(float32, inline)
TILE64 = _tile.build(float64, inline)


def tile_math(acc):
    return TILE64 if acc == float64 else TILE32


VECTOR_BYTES = 16


def vector_width(itemsize):
    """Elements of ``itemsize`` bytes in one 16-byte vector load."""
    return VECTOR_BYTES // itemsize


if config.ENABLE_CUDASIM:  # the simulator runs kernels as Python: NumPy views stand in for the casts
    def as_float32(bits):
        return np.uint32(bits).view(np.float32)

    def bits_of(x):
        return np.uint32(np.float32(x).view(np.uint32))

    def load16(array, row, col):
        """The 16 bytes of ``array[row, col:]`` as a tuple of elements."""
        return tuple(array[row, col:col + vector_width(array.dtype.itemsize)])
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils, libdevice
    from numba.cuda.extending import intrinsic

    @intrinsic
    def load16(typingctx, array, row, col):
        """The 16 bytes of ``array[row, col:]`` (2-d, C-contiguous, 16-byte aligned there) as one
        vector load, returned as a tuple of ``16 // itemsize`` elements."""
        width = vector_width(array.dtype.bitwidth // 8)
        signature = types.UniTuple(array.dtype, width)(array, row, col)

        def codegen(context, builder, sig, args):
            array_type = sig.args[0]
            ary = context.make_array(array_type)(context, builder, value=args[0])
            r = context.cast(builder, args[1], sig.args[1], types.intp)
            c = context.cast(builder, args[2], sig.args[2], types.intp)
            ptr = cgutils.get_item_pointer(context, builder, array_type, ary, [r, c], wraparound=False)
            element = context.get_value_type(array_type.dtype)
            vec = builder.load(builder.bitcast(ptr, ir.VectorType(element, width).as_pointer()), align=16)
            items = [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(width)]
            return context.make_tuple(builder, sig.return_type, items)

        return signature, codegen

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
