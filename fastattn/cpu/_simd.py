"""Explicit 8-lane float32 vectors for the CPU decode kernel.

LLVM's loop vectoriser keeps an accumulator in memory between the passes of
an outer loop; the decode kernel needs the opposite: a few vectors of output
held in registers while it walks many keys.  ``Vec8`` is a numba type whose
LLVM form is ``<8 x float>``; the intrinsics below load, convert, multiply-add
and store it, and compile to one or two instructions each (AVX ``ymm``
registers on x86, two NEON registers on AArch64).

Loads convert from the cache's storage format, chosen by the array's dtype
(the caller makes these views, :func:`simd_view`):

======== =================== =========================================
dtype     storage             conversion
======== =================== =========================================
float32   float32             none
uint16    IEEE half           ``fpext half`` (``vcvtph2ps``)
int16     bfloat16            ``bits << 16``
uint8     float8_e4m3fn       re-biased to half, then ``* 2**8``
int8      float8_e5m2         ``bits << 8`` is the same number in half
======== =================== =========================================
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .._dtypes import BF16, E4M3, E5M2, F16, NATIVE, codec_of

LANES = 8
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)


class Vec8Type(types.Type):
    """Eight float32 lanes held in a register."""

    def __init__(self):
        super().__init__(name="Vec8")


vec8 = Vec8Type()


@register_model(Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


_VIEW_OF_CODEC = {NATIVE: None, F16: np.uint16, BF16: np.int16, E4M3: np.uint8, E5M2: np.int8}


def simd_view(x):
    """``x`` (float32 or a 16/8-bit float array) as the dtype that tells :func:`vload` its format."""
    view = _VIEW_OF_CODEC[codec_of(x.dtype)]
    return x if view is None else x.view(view)


def _splat(value, ty):
    return ir.Constant(ir.VectorType(ty, LANES), [value] * LANES)


def _convert(builder, raw, dtype):
    """<8 x storage> -> <8 x float>."""
    i16 = ir.IntType(16)
    half = ir.VectorType(ir.HalfType(), LANES)
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(raw, half), _VEC)
    if dtype == types.int16:
        wide = builder.zext(raw, ir.VectorType(ir.IntType(32), LANES))
        return builder.bitcast(builder.shl(wide, _splat(16, ir.IntType(32))), _VEC)
    wide = builder.zext(raw, ir.VectorType(i16, LANES))
    if dtype == types.int8:
        return builder.fpext(builder.bitcast(builder.shl(wide, _splat(8, i16)), half), _VEC)
    # float8_e4m3fn: sign-extended to 16 bits and shifted left by 7, the byte's exponent and mantissa
    # sit under half's and its sign is bit 15; clearing bit 14 (a copy of the sign) leaves the half
    # that is the value times 2**-8.  The NaN pattern (all seven low bits set) becomes half's NaN.
    bits = builder.and_(builder.shl(builder.sext(raw, ir.VectorType(i16, LANES)), _splat(7, i16)),
                        _splat(0xBFFF, i16))
    is_nan = builder.icmp_unsigned("==", builder.and_(bits, _splat(0x3F80, i16)), _splat(0x3F80, i16))
    bits = builder.select(is_nan, builder.or_(bits, _splat(0x7C00, i16)), bits)
    return builder.fmul(builder.fpext(builder.bitcast(bits, half), _VEC), _splat(256.0, _F32))


_STORAGE = {types.float32: _F32, types.uint16: ir.IntType(16), types.int16: ir.IntType(16),
            types.uint8: ir.IntType(8), types.int8: ir.IntType(8)}


def _pointer(context, builder, aryty, ary, idx):
    array = context.make_array(aryty)(context, builder, ary)
    return cgutils.get_item_pointer(context, builder, aryty, array, [idx], wraparound=False)


@intrinsic
def vload(typingctx, arr, idx):
    """``arr[idx : idx + 8]`` as float32 lanes (1-d array; no bounds check)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype not in _STORAGE:
        return None

    def codegen(context, builder, sig, args):
        storage = _STORAGE[sig.args[0].dtype]
        pointer = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]),
                                  ir.VectorType(storage, LANES).as_pointer())
        raw = builder.load(pointer, align=1)
        return raw if sig.args[0].dtype == types.float32 else _convert(builder, raw, sig.args[0].dtype)

    return vec8(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """``arr[idx : idx + 8] = v`` for a 1-d float32 array (no bounds check)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        pointer = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), _VEC.as_pointer())
        builder.store(args[2], pointer, align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def vzero(typingctx):
    """Eight zeros."""
    return vec8(), lambda context, builder, sig, args: _splat(0.0, _F32)


@intrinsic
def vsplat(typingctx, x):
    """Eight copies of the float32 ``x``."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, one, _splat(0, ir.IntType(32)))

    return vec8(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, fused."""
    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fma.v8f32")
        return builder.call(fma, args)

    return vec8(vec8, vec8, vec8), codegen


@intrinsic
def vsum(typingctx, a):
    """The sum of the eight lanes (in a tree, not in lane order)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        for width in (4, 2, 1):
            upper = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                             [(i + width) % LANES for i in range(LANES)]))
            v = builder.fadd(v, upper)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(vec8), codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Ask for the cache line holding ``arr[idx]`` (1-d array) ahead of its use; never faults."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None

    def codegen(context, builder, sig, args):
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        pointer = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), byte)
        # read, keep in all cache levels, data cache
        builder.call(fn, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen
