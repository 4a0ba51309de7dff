"""Explicit 16-lane float32 vectors for the CPU decode kernel.

LLVM's loop vectoriser keeps an accumulator in memory between the passes of
an outer loop; the decode kernel needs the opposite: a few vectors of output
held in registers while it walks many keys.  ``Vec`` is a numba type whose
LLVM form is ``<16 x float>``; the intrinsics below load, convert, multiply-add
and store it, and compile to one instruction each on AVX-512 (``zmm``
registers: LLVM uses them for explicit 512-bit vectors even where its loop
vectoriser prefers 256 bits, and the decode loops ran twice as fast as with
8 lanes) and to two or four on AVX2 or NEON.

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

LANES = 16
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)


class VecType(types.Type):
    """LANES float32 lanes held in a register."""

    def __init__(self):
        super().__init__(name=f"Vec{LANES}")


vec = VecType()


@register_model(VecType)
class _VecModel(models.PrimitiveModel):
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
    """<LANES x storage> -> <LANES x float>."""
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
    """``arr[idx : idx + LANES]`` as float32 lanes (1-d array; no bounds check)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype not in _STORAGE:
        return None

    def codegen(context, builder, sig, args):
        storage = _STORAGE[sig.args[0].dtype]
        pointer = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]),
                                  ir.VectorType(storage, LANES).as_pointer())
        raw = builder.load(pointer, align=1)
        return raw if sig.args[0].dtype == types.float32 else _convert(builder, raw, sig.args[0].dtype)

    return vec(arr, idx), codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """``arr[idx : idx + LANES] = v`` for a 1-d float32 array (no bounds check)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        pointer = builder.bitcast(_pointer(context, builder, sig.args[0], args[0], args[1]), _VEC.as_pointer())
        builder.store(args[2], pointer, align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def vzero(typingctx):
    """LANES zeros."""
    return vec(), lambda context, builder, sig, args: _splat(0.0, _F32)


@intrinsic
def vsplat(typingctx, x):
    """LANES copies of the float32 ``x``."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(one, one, _splat(0, ir.IntType(32)))

    return vec(x), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, fused."""
    def codegen(context, builder, sig, args):
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3),
                                             f"llvm.fma.v{LANES}f32")
        return builder.call(fma, args)

    return vec(vec, vec, vec), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` lane by lane."""
    return vec(vec, vec), lambda context, builder, sig, args: builder.fadd(args[0], args[1])


@intrinsic
def vsum(typingctx, a):
    """The sum of the lanes (in a tree, not in lane order)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        width = LANES // 2
        while width:
            upper = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                             [(i + width) % LANES for i in range(LANES)]))
            v = builder.fadd(v, upper)
            width //= 2
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(vec), codegen


def _pair_sums(builder, x, y, seg):
    """x, y hold sums in segments of ``seg`` lanes; add the halves of each: segments of seg/2, x's then y's."""
    i32 = ir.IntType(32)
    count = LANES // seg
    low = [j * seg + t for j in range(count) for t in range(seg // 2)]
    low = low + [LANES + k for k in low]
    high = [k + seg // 2 for k in low]
    pick = lambda lanes: builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, LANES), lanes))
    return builder.fadd(pick(low), pick(high))


@intrinsic
def vsums8(typingctx, a0, a1, a2, a3, a4, a5, a6, a7):
    """The lane sums of eight vectors, as a tuple: shared shuffles, a third of eight :func:`vsum`."""
    def codegen(context, builder, sig, args):
        vectors, seg = list(args), LANES
        while len(vectors) > 1:
            vectors = [_pair_sums(builder, x, y, seg) for x, y in zip(vectors[::2], vectors[1::2])]
            seg //= 2
        v = vectors[0]
        while seg > 1:  # each sum still spread over seg lanes
            v = _pair_sums(builder, v, v, seg)
            seg //= 2
        sums = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in range(8)]
        return context.make_tuple(builder, sig.return_type, sums)

    return types.UniTuple(types.float32, 8)(vec, vec, vec, vec, vec, vec, vec, vec), codegen


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
