"""CPU-only helpers that let LLVM vectorise the inner loops.

Numba's ``np.exp`` is a scalar libm call here (no SVML); the exponential below
is a degree-6 polynomial with the power of two built in the exponent bits, and
half/bfloat16 decoding is a shift and a bit cast.  They compile to straight
SIMD code inside the attention kernels.
"""
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .._dtypes import BF16, E4M3, FP8_TABLE, encode_bits
from ._simd import LANES, vadd, vexp_nonpos, vload, vmax, vmax_lanes, vsplat, vstore, vsub, vsum, vzero

# fastmath without nnan/ninf: kernels rely on -inf and must see NaN.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _bits_to_f32(typingctx, x):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(inline="always", fastmath=FASTMATH)
def exp_nonpos(x):
    """exp(x) for float32 x <= 0 (and -inf -> 0), relative error ~2e-7."""
    x = max(x, np.float32(-87.3))
    t = x * np.float32(1.4426950408889634)
    n = np.floor(t + np.float32(0.5))
    f = t - n  # in [-0.5, 0.5], where the polynomial below is fitted
    p = np.float32(1.535336188319500e-4)
    p = p * f + np.float32(1.339887440266574e-3)
    p = p * f + np.float32(9.618437357674640e-3)
    p = p * f + np.float32(5.550332471162809e-2)
    p = p * f + np.float32(2.402264791363012e-1)
    p = p * f + np.float32(6.931472028550421e-1)
    p = p * f + np.float32(1.0)
    scale = _bits_to_f32(np.uint32((np.int32(n) + 127) << 23))
    # below -87.3 the row weight is < 1e-38 of the maximum: flush it to an exact 0
    return p * scale if x > np.float32(-87.0) else np.float32(0.0)


@njit(inline="always", fastmath=FASTMATH)
def _max_of_lanes(row):
    """Largest element of a non-empty 1-d array, in eight SIMD-friendly scalar lanes (no allocation)."""
    n = row.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    for c0 in range(0, n - 7, 8):
        x = row[c0]
        m0 = x if x > m0 else m0
        x = row[c0 + 1]
        m1 = x if x > m1 else m1
        x = row[c0 + 2]
        m2 = x if x > m2 else m2
        x = row[c0 + 3]
        m3 = x if x > m3 else m3
        x = row[c0 + 4]
        m4 = x if x > m4 else m4
        x = row[c0 + 5]
        m5 = x if x > m5 else m5
        x = row[c0 + 6]
        m6 = x if x > m6 else m6
        x = row[c0 + 7]
        m7 = x if x > m7 else m7
    best = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for c in range(n - n % 8, n):
        best = max(best, row[c])
    return best


@njit(inline="always", fastmath=FASTMATH)
def _max_of_vec(row):
    """Largest element of a contiguous float32 row of at least LANES elements, in one vector."""
    n = row.size
    m = vload(row, 0)
    for c in range(LANES, n - LANES + 1, LANES):
        m = vmax(vload(row, c), m)
    best = vmax_lanes(m)
    for c in range(n - n % LANES, n):
        best = max(best, row[c])
    return best


def max_of(row):
    """Largest element of a non-empty 1-d array (no allocation)."""


@overload(max_of, inline="always", fastmath=FASTMATH)
def _max_of(row):
    if row.dtype == types.float32 and row.layout == "C":
        return lambda row: _max_of_vec(row) if row.size >= LANES else _max_of_lanes(row)
    return lambda row: _max_of_lanes(row)


def exp_row(row, shift):
    """``row[:] = exp(row - shift)`` in place (every element <= shift); return the row's new sum."""


@overload(exp_row, inline="always", fastmath=FASTMATH)
def _exp_row(row, shift):
    if row.dtype == types.float32 and row.layout == "C":
        return lambda row, shift: _exp_row_vec(row, shift)
    return lambda row, shift: _exp_row_scalar(row, shift)


@njit(inline="always", fastmath=FASTMATH)
def _exp_row_scalar(row, shift):
    total = shift * 0  # a zero of the row's precision; shift is finite (row[0] may be -inf)
    for c in range(row.size):
        e = exp_shifted(row[c], shift)
        row[c] = e
        total += e
    return total


@njit(inline="always", fastmath=FASTMATH)
def _exp_row_vec(row, shift):
    n = row.size
    by = vsplat(shift)
    sums = vzero()
    for c in range(0, n - LANES + 1, LANES):
        e = vexp_nonpos(vsub(vload(row, c), by))
        vstore(row, c, e)
        sums = vadd(sums, e)
    total = vsum(sums)
    for c in range(n - n % LANES, n):
        e = exp_nonpos(row[c] - shift)
        row[c] = e
        total += e
    return total


def exp_shifted(x, shift):
    """exp(x - shift) in the precision of x (fast path for float32)."""


@overload(exp_shifted, inline="always", fastmath=FASTMATH)
def _exp_shifted(x, shift):
    if x == types.float32:
        return lambda x, shift: exp_nonpos(x - shift)
    return lambda x, shift: np.exp(x - shift)


@njit(inline="always", fastmath=FASTMATH)
def _tanh_series(z):
    """tanh(y) / y for z = y*y < 0.25, relative error < 1e-7."""
    p = np.float32(-929569.0 / 638512875.0)
    p = p * z + np.float32(21844.0 / 6081075.0)
    p = p * z + np.float32(-1382.0 / 155925.0)
    p = p * z + np.float32(62.0 / 2835.0)
    p = p * z + np.float32(-17.0 / 315.0)
    p = p * z + np.float32(2.0 / 15.0)
    p = p * z + np.float32(-1.0 / 3.0)
    return p * z + np.float32(1.0)


def softcap_fast(x, softcap):
    """``softcap * tanh(x / softcap)`` (identity for 0), vectorisable for float32."""


@overload(softcap_fast, inline="always", fastmath=FASTMATH)
def _softcap_fast(x, softcap):
    if x == types.float32:
        def capped32(x, softcap):
            if softcap <= 0:
                return x
            y = x / np.float32(softcap)
            a = abs(y)
            e = exp_nonpos(np.float32(-2.0) * a)
            t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
            if a < np.float32(0.5):  # 1 - e cancels here: Taylor series to y**15 instead
                t = a * _tanh_series(a * a)
            return np.float32(softcap) * (t if y >= 0 else -t)
        return capped32
    return lambda x, softcap: softcap * np.tanh(x / softcap) if softcap > 0 else x


def decode_rows(src, dst, codec):
    """Copy a 2-D block of q/k/v rows into an accumulation-precision buffer."""


@overload(decode_rows, fastmath=FASTMATH)
def _decode_rows(src, dst, codec):
    if isinstance(src.dtype, types.Float):
        def copy(src, dst, codec):
            for r in range(src.shape[0]):
                for c in range(src.shape[1]):
                    dst[r, c] = src[r, c]
        return copy

    if src.dtype == types.uint16:
        def unpack16(src, dst, codec):
            for r in range(src.shape[0]):
                if codec == BF16:
                    for c in range(src.shape[1]):
                        dst[r, c] = _bits_to_f32(np.uint32(src[r, c]) << 16)
                else:
                    for c in range(src.shape[1]):
                        dst[r, c] = _f16_to_f32(src[r, c])
        return unpack16

    def unpack8(src, dst, codec):
        for r in range(src.shape[0]):
            if codec == E4M3:
                for c in range(src.shape[1]):
                    dst[r, c] = _e4m3_to_f32(src[r, c])
            else:
                for c in range(src.shape[1]):
                    dst[r, c] = _e5m2_to_f32(src[r, c])
    return unpack8


def decode_one(x, codec):
    """One float16/bfloat16 value from its bits (``uint16``), or a float as it is."""


@overload(decode_one, fastmath=FASTMATH)  # not IR-inlined (LLVM still inlines it): used twice in one function
def _decode_one(x, codec):
    if isinstance(x, types.Float):
        return lambda x, codec: x
    return lambda x, codec: _bits_to_f32(np.uint32(x) << 16) if codec == BF16 else _f16_to_f32(x)


#: The CPU converts half precision in hardware (x86 F16C, or any AArch64).
HARDWARE_F16 = bool(llvm.get_host_cpu_features().get("f16c")) or llvm.get_process_triple().startswith("aarch64")


@intrinsic
def _f16_bits_to_f32(typingctx, x):
    """IEEE half bits -> float32 with LLVM's ``fpext half``: one ``vcvtph2ps`` per vector."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


def _f16_to_f32(h):
    """IEEE half bits -> float32, exact for every bit pattern."""


@overload(_f16_to_f32, inline="always", fastmath=FASTMATH)
def _f16_to_f32_impl(h):
    return (lambda h: _f16_bits_to_f32(np.uint16(h))) if HARDWARE_F16 else _f16_to_f32_soft


def decode_token(src, r0, dst, c, codec):
    """Decode rows ``src[r0 : r0 + h]`` (one token's KV heads) into ``dst[:h, c]`` of a [h, n, D] buffer.

    Indices, not slices: a slice per row costs more than decoding it.
    """


@overload(decode_token, fastmath=FASTMATH)
def _decode_token(src, r0, dst, c, codec):
    if isinstance(src.dtype, types.Float):
        def copy(src, r0, dst, c, codec):
            for u in range(dst.shape[0]):
                for d in range(dst.shape[2]):
                    dst[u, c, d] = src[r0 + u, d]
        return copy

    if src.dtype == types.uint16:
        def unpack16(src, r0, dst, c, codec):
            if codec == BF16:
                for u in range(dst.shape[0]):
                    for d in range(dst.shape[2]):
                        dst[u, c, d] = _bits_to_f32(np.uint32(src[r0 + u, d]) << 16)
            else:
                for u in range(dst.shape[0]):
                    for d in range(dst.shape[2]):
                        dst[u, c, d] = _f16_to_f32(src[r0 + u, d])
        return unpack16

    def unpack8(src, r0, dst, c, codec):
        if codec == E4M3:
            for u in range(dst.shape[0]):
                for d in range(dst.shape[2]):
                    dst[u, c, d] = _e4m3_to_f32(src[r0 + u, d])
        else:
            for u in range(dst.shape[0]):
                for d in range(dst.shape[2]):
                    dst[u, c, d] = _e5m2_to_f32(src[r0 + u, d])
    return unpack8


# fp8 through the half-precision converter: e5m2 is the top byte of a float16;
# e4m3fn's 7 low bits, placed as a float16's exponent and mantissa, read as the
# value times 2**-8 (normals and subnormals alike), and its one NaN pattern
# (S.1111.111) is patched.  Without hardware half conversion: a lookup table.

@njit(inline="always", fastmath=FASTMATH)
def _e5m2_to_f32(x):
    if HARDWARE_F16:
        return _f16_to_f32(np.uint16(x) << 8)
    return FP8_TABLE[1, x]


@njit(inline="always", fastmath=FASTMATH)
def _e4m3_to_f32(x):
    if HARDWARE_F16:
        bits = np.uint16(x)
        mag = _f16_to_f32((bits & np.uint16(0x7F)) << 7) * np.float32(256.0)
        if bits & np.uint16(0x7F) == np.uint16(0x7F):
            mag = np.float32(np.nan)
        return -mag if bits & np.uint16(0x80) else mag
    return FP8_TABLE[0, x]


@njit(inline="always", fastmath=FASTMATH)
def _f16_to_f32_soft(h):
    """IEEE half bits -> float32, exact, branch-free for normals and subnormals."""
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << 16
    rest = h & np.uint32(0x7FFF)
    # move exponent+mantissa into float32 position, rebias by 2**112
    mag = _bits_to_f32(rest << 13) * np.float32(5.192296858534828e33)
    if rest >= np.uint32(0x7C00):  # inf / NaN
        mag = _bits_to_f32((rest << 13) | np.uint32(0x7F800000))
    return _bits_to_f32(_f32_to_bits(mag) | sign)


def encode_row(src, dst, codec):
    """Store one accumulation-precision row into the output's dtype."""


@overload(encode_row, fastmath=FASTMATH)
def _encode_row(src, dst, codec):
    if isinstance(dst.dtype, types.Float):
        def store(src, dst, codec):
            for c in range(src.shape[0]):
                dst[c] = src[c]
        return store

    if dst.dtype == types.uint8:
        if src.dtype == types.float32:
            def pack8_fast(src, dst, codec):  # fp8 stores saturate, as the fp8 contract asks
                if codec == E4M3:
                    for c in range(src.shape[0]):
                        dst[c] = _f32_to_fp8(src[c], 3, 7, np.float32(448.0))
                else:
                    for c in range(src.shape[0]):
                        dst[c] = _f32_to_fp8(src[c], 2, 15, np.float32(57344.0))
            return pack8_fast

        def pack8(src, dst, codec):
            ebits, mbits, has_inf = (4, 3, False) if codec == E4M3 else (5, 2, True)
            for c in range(src.shape[0]):
                dst[c] = encode_bits(src[c], ebits, mbits, has_inf, True)
        return pack8

    def pack16(src, dst, codec):
        if codec == BF16:
            for c in range(src.shape[0]):
                dst[c] = _f32_to_bf16(np.float32(src[c]))
        else:
            for c in range(src.shape[0]):
                dst[c] = _to_f16_bits(src[c])
    return pack16


@intrinsic
def _f32_to_f16_hw(typingctx, x):
    """float32 -> IEEE half bits with LLVM's ``fptrunc`` (round to nearest even; ``vcvtps2ph``)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


def _to_f16_bits(x):
    """A float as IEEE half bits, rounding to nearest even (overflow to inf)."""


@overload(_to_f16_bits, inline="always", fastmath=FASTMATH)
def _to_f16_bits_impl(x):
    if x == types.float32 and HARDWARE_F16:
        return lambda x: _f32_to_f16_hw(x)
    return lambda x: np.uint16(encode_bits(x, 5, 10, True, False))  # one rounding from float64 too


@njit(inline="always", fastmath=FASTMATH)
def _f32_to_fp8(x, mbits, bias, largest):
    """float32 -> saturated fp8 bits (e4m3fn: mbits 3, bias 7; e5m2: 2, 15), rounding to nearest even.

    Integer arithmetic on the float32 bits, so it vectorises: normals round
    their mantissa with the carry running into the exponent; values below the
    smallest normal round on the subnormal grid; NaN stays NaN.
    """
    bits = _f32_to_bits(x)
    sign = np.uint32((bits >> 24) & 0x80)
    a = min(abs(x), largest)                       # saturate (NaN falls through: min keeps NaN here)
    u = _f32_to_bits(a)
    shift = 23 - mbits
    normal = u + np.uint32((1 << (shift - 1)) - 1) + ((u >> shift) & np.uint32(1))
    normal = (normal >> shift) - np.uint32((127 - bias) << mbits)
    sub_step = np.float32(2.0 ** (1 - bias - mbits))
    sub = np.uint32(np.rint(a / sub_step))         # subnormals: multiples of the smallest step
    out = normal if a >= np.float32(2.0 ** (1 - bias)) else sub
    if x != x:
        out = np.uint32(0x7F if mbits == 3 else 0x7E)
    return np.uint8(sign | out)


@njit(inline="always")
def _f32_to_bf16(x):
    u = _f32_to_bits(x)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays quiet NaN
        return np.uint16((u >> 16) | np.uint32(0x40))
    u = u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    return np.uint16(u >> 16)

