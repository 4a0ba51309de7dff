"""Explicit 16-lane float32 vectors for the CPU decode kernel and the tile products (:mod:`._gemm`).

LLVM's loop vectoriser keeps an accumulator in memory between the passes of
an outer loop; the decode kernel needs the opposite: a few vectors of output
held in registers while it walks many keys.  ``Vec`` is a numba type whose
LLVM form is ``<16 x float>``; the intrinsics below load, convert, multiply-add
and store it, and compile to one instruction each on AVX-512 (``zmm``
registers: LLVM uses them for explicit 512-bit vectors even where its loop
vectoriser prefers 256 bits, and the decode loops ran twice as fast as with
8 lanes) and to two or four on AVX2 or NEON.

Loads and stores take a 1-d array or a raw pointer (:func:`data_of`); the
decode loops use pointers, since an array used inside a hot loop can cost
numba two atomic reference-count updates per pass.  Loads convert from the
cache's storage format, chosen by the element type (the caller makes these
views, :func:`simd_view`):

======== =================== =========================================
dtype     storage             conversion
======== =================== =========================================
float32   float32             none
uint16    IEEE half           ``fpext half`` (``vcvtph2ps``)
int16     bfloat16            ``bits << 16``
uint8     float8_e4m3fn       re-biased to half: the value ``* 2**-8``
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
# e4m3fn loads give the value times 2**-8 (one multiply fewer per vector); multiply by this
E4M3_SCALE = 256.0
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


def _splat(value, ty, lanes=LANES):
    return ir.Constant(ir.VectorType(ty, lanes), [value] * lanes)


def _convert(builder, raw, dtype):
    """<n x storage> -> <n x float> (n = LANES or 2 LANES)."""
    n = raw.type.count
    i16 = ir.IntType(16)
    half = ir.VectorType(ir.HalfType(), n)
    floats = ir.VectorType(_F32, n)
    if dtype == types.uint16:
        return builder.fpext(builder.bitcast(raw, half), floats)
    if dtype == types.int16:
        wide = builder.zext(raw, ir.VectorType(ir.IntType(32), n))
        return builder.bitcast(builder.shl(wide, _splat(16, ir.IntType(32), n)), floats)
    wide = builder.zext(raw, ir.VectorType(i16, n))
    if dtype == types.int8:
        return builder.fpext(builder.bitcast(builder.shl(wide, _splat(8, i16, n)), half), floats)
    # float8_e4m3fn: sign-extended to 16 bits and shifted left by 7, the byte's exponent and mantissa
    # sit under half's and its sign is bit 15; clearing bit 14 (a copy of the sign) leaves the half
    # that is the value times 2**-8 (E4M3_SCALE: callers fold the 2**8 into their scales).  The NaN
    # pattern (all seven low bits set) becomes half's NaN.
    bits = builder.and_(builder.shl(builder.sext(raw, ir.VectorType(i16, n)), _splat(7, i16, n)),
                        _splat(0xBFFF, i16, n))
    is_nan = builder.icmp_unsigned("==", builder.and_(bits, _splat(0x3F80, i16, n)), _splat(0x3F80, i16, n))
    bits = builder.select(is_nan, builder.or_(bits, _splat(0x7C00, i16, n)), bits)
    return builder.fpext(builder.bitcast(bits, half), floats)


_STORAGE = {types.float32: _F32, types.uint16: ir.IntType(16), types.int16: ir.IntType(16),
            types.uint8: ir.IntType(8), types.int8: ir.IntType(8)}


def _element(x):
    """The element type of a 1-d array or a pointer ``x`` (None for anything else)."""
    if isinstance(x, types.Array) and x.ndim == 1:
        return x.dtype
    if isinstance(x, types.CPointer):
        return x.dtype
    return None


def _address(context, builder, xty, x, idx):
    """Pointer to element idx of a 1-d array or past a pointer."""
    if isinstance(xty, types.CPointer):
        return builder.gep(x, [idx])
    array = context.make_array(xty)(context, builder, x)
    return cgutils.get_item_pointer(context, builder, xty, array, [idx], wraparound=False)


def _load(context, builder, sig, args, lanes):
    """``lanes`` elements at (x, idx), converted to float32."""
    storage = _STORAGE[_element(sig.args[0])]
    pointer = builder.bitcast(_address(context, builder, sig.args[0], args[0], args[1]),
                              ir.VectorType(storage, lanes).as_pointer())
    raw = builder.load(pointer, align=1)
    dtype = _element(sig.args[0])
    return raw if dtype == types.float32 else _convert(builder, raw, dtype)


@intrinsic
def data_of(typingctx, arr):
    """A pointer to the first element of a C-contiguous array.

    The decode loops address the cache, the queries and their sums through
    pointers: an array (or a row view of one) used inside a hot loop can cost
    two atomic reference-count updates per pass.  The array must outlive the
    pointer.
    """
    if not isinstance(arr, types.Array) or arr.layout != "C":
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def line_elements(typingctx, x):
    """Elements of ``x`` (an array or a pointer) to a 64-byte cache line, as a constant the compiler
    sees (loops that step by it need no division and unroll)."""
    dtype = x.dtype if isinstance(x, (types.Array, types.CPointer)) else None
    if not isinstance(dtype, types.Number):
        return None
    count = max(1, 64 // (dtype.bitwidth // 8))
    return types.intp(x), lambda context, builder, sig, args: context.get_constant(types.intp, count)


@intrinsic
def vload(typingctx, x, idx):
    """``x[idx : idx + LANES]`` as float32 lanes (x a 1-d array or a pointer; no bounds check)."""
    if _element(x) not in _STORAGE or not isinstance(idx, types.Integer):
        return None
    return vec(x, idx), lambda context, builder, sig, args: _load(context, builder, sig, args, LANES)


@intrinsic
def vload2(typingctx, x, idx):
    """``x[idx : idx + 2 LANES]`` as two vectors of float32 lanes (no bounds check).

    One conversion over twice the lanes: the integer steps of the 8-bit
    formats then work on full 512-bit registers.
    """
    if _element(x) not in _STORAGE or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        both = _load(context, builder, sig, args, 2 * LANES)
        i32 = ir.IntType(32)
        low = builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(i32, LANES), list(range(LANES))))
        high = builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(i32, LANES),
                                                              list(range(LANES, 2 * LANES))))
        return context.make_tuple(builder, sig.return_type, [low, high])

    return types.UniTuple(vec, 2)(x, idx), codegen


@intrinsic
def vstore(typingctx, x, idx, v):
    """``x[idx : idx + LANES] = v`` (x a 1-d float32 array or pointer; no bounds check)."""
    if _element(x) != types.float32:
        return None

    def codegen(context, builder, sig, args):
        pointer = builder.bitcast(_address(context, builder, sig.args[0], args[0], args[1]), _VEC.as_pointer())
        builder.store(args[2], pointer, align=1)
        return context.get_dummy_value()

    return types.void(x, idx, v), codegen


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


def _lane_tree(builder, v, combine):
    """Fold the lanes of v pairwise with ``combine(builder, v, upper)``; the result is lane 0."""
    width = LANES // 2
    while width:
        upper = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                         [(i + width) % LANES for i in range(LANES)]))
        v = combine(builder, v, upper)
        width //= 2
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


@intrinsic
def vsum(typingctx, a):
    """The sum of the lanes (in a tree, not in lane order)."""
    def codegen(context, builder, sig, args):
        return _lane_tree(builder, args[0], lambda b, v, upper: b.fadd(v, upper))

    return types.float32(vec), codegen


@intrinsic
def vsub(typingctx, a, b):
    """``a - b`` lane by lane."""
    return vec(vec, vec), lambda context, builder, sig, args: builder.fsub(args[0], args[1])


@intrinsic
def vmax(typingctx, a, b):
    """``a if a > b else b`` lane by lane (a NaN in a is not taken)."""
    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return vec(vec, vec), codegen


@intrinsic
def vmax_lanes(typingctx, a):
    """The largest lane (a NaN lane is not taken unless every lane is NaN)."""
    def codegen(context, builder, sig, args):
        return _lane_tree(builder, args[0], lambda b, v, upper: b.select(b.fcmp_ordered(">", upper, v), upper, v))

    return types.float32(vec), codegen


# exp(f) on [-0.5, 0.5]: the coefficients of fastattn.cpu._fastmath.exp_nonpos, highest power first
_EXP_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
             2.402264791363012e-1, 6.931472028550421e-1, 1.0)


@intrinsic
def vexp_nonpos(typingctx, a):
    """exp(x) lane by lane for x <= 0, as :func:`fastattn.cpu._fastmath.exp_nonpos` (NaN and x < -87 give 0)."""
    def codegen(context, builder, sig, args):
        module = builder.module
        fma = cgutils.get_or_insert_function(module, ir.FunctionType(_VEC, [_VEC] * 3), f"llvm.fma.v{LANES}f32")
        floor = cgutils.get_or_insert_function(module, ir.FunctionType(_VEC, [_VEC]), f"llvm.floor.v{LANES}f32")
        i32v = ir.VectorType(ir.IntType(32), LANES)
        x = args[0]
        low = _splat(-87.3, _F32)
        x = builder.select(builder.fcmp_ordered("<", x, low), low, x)
        t = builder.fmul(x, _splat(1.4426950408889634, _F32))
        n = builder.call(floor, [builder.fadd(t, _splat(0.5, _F32))])
        f = builder.fsub(t, n)
        p = _splat(_EXP_POLY[0], _F32)
        for c in _EXP_POLY[1:]:
            p = builder.call(fma, [p, f, _splat(c, _F32)])
        exponent = builder.shl(builder.add(builder.fptosi(n, i32v), _splat(127, ir.IntType(32))),
                               _splat(23, ir.IntType(32)))
        y = builder.fmul(p, builder.bitcast(exponent, _VEC))
        return builder.select(builder.fcmp_ordered(">", x, _splat(-87.0, _F32)), y, _splat(0.0, _F32))

    return vec(vec), codegen


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
def vsums16(typingctx, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    """The lane sums of sixteen vectors, as one vector (lane k holds the sum of vector k)."""
    def codegen(context, builder, sig, args):
        vectors, seg = list(args), LANES
        while len(vectors) > 1:
            vectors = [_pair_sums(builder, x, y, seg) for x, y in zip(vectors[::2], vectors[1::2])]
            seg //= 2
        return vectors[0]

    return vec(*[vec] * LANES), codegen


@intrinsic
def vlane(typingctx, v, k):
    """Lane k of v."""
    if not isinstance(k, types.Integer):
        return None
    return types.float32(v, k), lambda context, builder, sig, args: builder.extract_element(args[0], args[1])


@intrinsic
def vstore4(typingctx, x, idx, v, k):
    """``x[idx : idx + 4] = v[4k : 4k + 4]`` (x a float32 array or pointer, k a constant; no bounds check)."""
    if not isinstance(k, types.IntegerLiteral) or _element(x) != types.float32:
        return None
    quarter = ir.VectorType(_F32, 4)

    def codegen(context, builder, sig, args):
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), 4), [4 * k.literal_value + t for t in range(4)])
        part = builder.shuffle_vector(args[2], args[2], lanes)
        pointer = builder.bitcast(_address(context, builder, sig.args[0], args[0], args[1]), quarter.as_pointer())
        builder.store(part, pointer, align=1)
        return context.get_dummy_value()

    return types.void(x, idx, v, k), codegen


@intrinsic
def prefetch_l2(typingctx, x, idx):
    """Ask for the cache line holding ``x[idx]`` (1-d array or pointer) in the second-level cache, not
    the first; never faults."""
    if _element(x) is None or not isinstance(idx, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        byte = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        pointer = builder.bitcast(_address(context, builder, sig.args[0], args[0], args[1]), byte)
        # read, locality 2 (keep out of the first level), data cache
        builder.call(fn, [pointer, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(x, idx), codegen
