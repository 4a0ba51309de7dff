"""Floating-point codecs shared by the CPU and CUDA kernels.

Half precision (IEEE float16), bfloat16 and the two fp8 formats are all
"small IEEE-like" formats that differ only in their exponent and mantissa
widths and in whether the all-ones exponent means inf/NaN.  One pair of
``register_jitable`` helpers, :func:`decode_bits` and :func:`encode_bits`,
handles all four; they compile for the CPU and the CUDA targets and run as
plain Python in the CUDA simulator.

Kernels never see ml_dtypes arrays: the caller passes ``.view(np.uint16)`` or
``.view(np.uint8)`` and a small integer *codec* telling the kernel how to read
the bits (see :data:`NATIVE`, :data:`F16`, ...).
"""
import math

import numpy as np
from numba.extending import register_jitable

#: Codec numbers passed to kernels.  NATIVE means "already float32/float64".
NATIVE, F16, BF16, E4M3, E5M2 = 0, 1, 2, 3, 4

# (exponent bits, mantissa bits, has inf) for each codec.
_FORMATS = {F16: (5, 10, True), BF16: (8, 7, True), E4M3: (4, 3, False), E5M2: (5, 2, True)}

# Dtypes are recognised by name, so that ml_dtypes (0.6 s to import) loads only
# when a caller needs one of its dtypes: an array of bfloat16 comes with it.
_CODEC_OF_NAME = {"float32": NATIVE, "float64": NATIVE, "float16": F16, "bfloat16": BF16,
                  "float8_e4m3fn": E4M3, "float8_e5m2": E5M2}
#: Names of the input dtypes, and of the fp8 cache dtypes.
FLOAT_NAMES = ("float32", "float64", "float16", "bfloat16")
FP8_NAMES = ("float8_e4m3fn", "float8_e5m2")


def _name(dtype):
    """The name of a native-byte-order dtype, else None."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.isnative else None


def is_float(dtype):
    """Whether ``dtype`` is float32, float64, float16 or (ml_dtypes) bfloat16."""
    return _name(dtype) in FLOAT_NAMES


def is_fp8(dtype):
    """Whether ``dtype`` is ml_dtypes' float8_e4m3fn or float8_e5m2."""
    return _name(dtype) in FP8_NAMES


@register_jitable
def decode_bits(bits, ebits, mbits, has_inf):
    """Decode an unsigned integer holding a small float into a Python/numba float.

    Exact for every bit pattern: each of these formats is a subset of float32.
    """
    bits = int(bits)
    sign = -1.0 if (bits >> (ebits + mbits)) & 1 else 1.0
    emax = (1 << ebits) - 1
    e = (bits >> mbits) & emax
    f = bits & ((1 << mbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if has_inf and e == emax:
        if f == 0:
            return sign * math.inf
        return math.nan
    if not has_inf and e == emax and f == (1 << mbits) - 1:
        return math.nan
    if e == 0:
        return sign * math.ldexp(float(f), 1 - bias - mbits)
    return sign * math.ldexp(float(f + (1 << mbits)), e - bias - mbits)


#: float32 values of every fp8 byte: row 0 float8_e4m3fn, row 1 float8_e5m2 (index codec - E4M3).
FP8_TABLE = np.array([[decode_bits(b, *_FORMATS[c]) for b in range(256)] for c in (E4M3, E5M2)], np.float32)


def codec_of(dtype):
    """Return the codec number for a NumPy dtype (KeyError if unsupported)."""
    codec = _CODEC_OF_NAME.get(_name(dtype))
    if codec is None:
        raise KeyError(np.dtype(dtype))
    return codec


def accum_dtype(dtype):
    """float64 for float64 inputs, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def bits_view(x):
    """View an array as what a kernel reads: floats as they are, small formats as uint bits."""
    codec = codec_of(x.dtype)
    if codec == NATIVE:
        return x
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8)


def format_of(codec):
    """(exponent bits, mantissa bits, has_inf) for a non-native codec."""
    return _FORMATS[codec]


@register_jitable
def _round_half_even(y):
    r = math.floor(y)
    d = y - r
    if d > 0.5 or (d == 0.5 and r % 2.0 == 1.0):
        r += 1.0
    return int(r)


@register_jitable
def encode_bits(x, ebits, mbits, has_inf, saturate):
    """Encode a float as the bits of a small float, rounding to nearest even.

    Overflow gives inf for formats that have it, or the largest finite value when
    ``saturate`` is true (always for formats without inf).  NaN stays NaN.
    """
    sign = 1 << (ebits + mbits)
    emax = (1 << ebits) - 1
    bias = (1 << (ebits - 1)) - 1
    mone = (1 << mbits) - 1
    if has_inf:
        inf_bits = emax << mbits
        nan_bits = inf_bits | (1 << (mbits - 1))
        max_bits = inf_bits - 1
    else:
        nan_bits = (emax << mbits) | mone
        inf_bits = nan_bits
        max_bits = nan_bits - 1
    if x != x:
        return nan_bits
    s = sign if (x < 0.0 or (x == 0.0 and math.copysign(1.0, x) < 0.0)) else 0
    a = abs(x)
    if a == math.inf:
        return s | (max_bits if (saturate or not has_inf) else inf_bits)
    if a == 0.0:
        return s
    e = math.frexp(a)[1] - 1          # a = 1.xxx * 2**e
    e = max(e, 1 - bias)              # subnormals share the smallest exponent
    if e > emax:                      # far beyond the range: avoid huge ldexp
        return s | (max_bits if (saturate or not has_inf) else inf_bits)
    n = _round_half_even(math.ldexp(a, mbits - e))
    out = (e + bias - 1) * (1 << mbits) + n  # the carry of n == 2**(mbits+1) is automatic
    limit = max_bits if (saturate or not has_inf) else inf_bits
    if out > limit:
        out = limit
    return s | out


def decode_array(raw, codec):
    """Decode a uint array of bits (any shape) into float32 with :func:`decode_bits`."""
    ebits, mbits, has_inf = format_of(codec)
    flat = np.asarray(raw).ravel()
    out = np.array([decode_bits(b, ebits, mbits, has_inf) for b in flat], dtype=np.float32)
    return out.reshape(np.shape(raw))


def encode_array(x, codec, saturate=True):
    """Encode floats (any shape) into uint bits with :func:`encode_bits`."""
    ebits, mbits, has_inf = format_of(codec)
    flat = np.asarray(x, dtype=np.float64).ravel()
    raw = np.array([encode_bits(v, ebits, mbits, has_inf, saturate) for v in flat])
    return raw.astype(np.uint16 if ebits + mbits > 7 else np.uint8).reshape(np.shape(x))


@register_jitable
def widen(x, codec):
    """Read one stored element as a float: native floats as they are, else decode the bits."""
    if codec == NATIVE:
        return float(x)
    if codec == F16:
        return decode_bits(x, 5, 10, True)
    if codec == BF16:
        return decode_bits(x, 8, 7, True)
    if codec == E4M3:
        return decode_bits(x, 4, 3, False)
    return decode_bits(x, 5, 2, True)


@register_jitable
def narrow(x, codec):
    """Value to store for a float: itself for native floats, else the encoded bits."""
    if codec == NATIVE:
        return x
    if codec == F16:
        return float(encode_bits(x, 5, 10, True, False))
    if codec == BF16:
        return float(encode_bits(x, 8, 7, True, False))
    if codec == E4M3:
        return float(encode_bits(x, 4, 3, False, True))
    return float(encode_bits(x, 5, 2, True, True))


def as_dtype(dtype):
    """``np.dtype(dtype)``, where a name may also be one of ml_dtypes' (``"bfloat16"``), loading it then."""
    if isinstance(dtype, str):
        return dtype_named(dtype)
    return np.dtype(dtype)


def dtype_named(name):
    """The NumPy dtype called ``name``: ``float32``, ... or an ml_dtypes one (``bfloat16``, ``float8_e4m3fn``)."""
    if name in ("bfloat16",) + FP8_NAMES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)
