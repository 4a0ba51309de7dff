"""The float16 / bfloat16 / fp8 codecs against NumPy and ml_dtypes, bit for bit.

Each codec runs three ways: as plain Python (``decode_array`` / ``encode_array``,
which is also how the CUDA simulator runs the kernels' helpers), compiled by
numba inside small ``@njit`` wrappers (how the kernels run them), and through
the CPU fast paths of ``fastattn.cpu._fastmath``.
"""
import ml_dtypes
import numpy as np
import pytest
from numba import njit

from fastattn._dtypes import BF16, E4M3, E5M2, F16, decode_array, decode_bits, encode_array, encode_bits, format_of
from fastattn._dtypes import narrow, widen
from fastattn.cpu._fastmath import _f16_to_f32, _f32_to_bf16, decode_rows, decode_token, encode_row

#: codec -> (NumPy dtype, bits dtype, number of bit patterns)
FORMATS = {
    F16: (np.dtype(np.float16), np.uint16),
    BF16: (np.dtype(ml_dtypes.bfloat16), np.uint16),
    E4M3: (np.dtype(ml_dtypes.float8_e4m3fn), np.uint8),
    E5M2: (np.dtype(ml_dtypes.float8_e5m2), np.uint8),
}
NAMES = {F16: "f16", BF16: "bf16", E4M3: "e4m3fn", E5M2: "e5m2"}
ALL_CODECS = pytest.mark.parametrize("codec", list(FORMATS), ids=NAMES.get)
HALF_CODECS = pytest.mark.parametrize("codec", [F16, BF16], ids=NAMES.get)


@pytest.fixture(autouse=True)
def _quiet_nan_casts():
    """Casting signalling NaNs and overflowing values is the point here: no FP warnings."""
    with np.errstate(invalid="ignore", over="ignore"):
        yield


def all_patterns(codec):
    bits = FORMATS[codec][1]
    return np.arange(np.iinfo(bits).max + 1, dtype=np.int64).astype(bits)


def expected_decode(codec):
    """float32 values of every bit pattern, decoded by NumPy / ml_dtypes."""
    dtype, _ = FORMATS[codec]
    return all_patterns(codec).view(dtype).astype(np.float32)


def assert_same_floats(got, expected, what):
    """Bit-identical float32 values, except that any NaN matches any NaN."""
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    nan = np.isnan(expected)
    wrong_nan = np.isnan(got) != nan
    assert not wrong_nan.any(), f"{what}: NaN mismatch at {np.flatnonzero(wrong_nan)[:8]}"
    diff = (got.view(np.uint32) != expected.view(np.uint32)) & ~nan
    idx = np.flatnonzero(diff)[:8]
    assert not diff.any(), f"{what}: {diff.sum()} values differ, at {idx}: got {got[idx]}, expected {expected[idx]}"


def assert_same_bits(got, expected_bits, codec, what, inputs):
    """Bit-identical encodings, except that an expected NaN needs only decode to NaN."""
    dtype, bits = FORMATS[codec]
    got = np.asarray(got).astype(bits)
    expected_nan = np.isnan(expected_bits.view(dtype).astype(np.float32))
    got_nan = np.isnan(got.view(dtype).astype(np.float32))
    wrong = np.where(expected_nan, ~got_nan, got != expected_bits)
    idx = np.flatnonzero(wrong)[:8]
    assert not wrong.any(), (f"{what}: {wrong.sum()} of {wrong.size} differ; inputs {inputs[idx]!r} "
                             f"gave {got[idx]}, expected {expected_bits[idx]}")


# --- decoding --------------------------------------------------------------------


@ALL_CODECS
def test_decode_array_matches_ml_dtypes_for_every_pattern(codec):
    assert_same_floats(decode_array(all_patterns(codec), codec), expected_decode(codec), "decode_array")


@njit
def _decode_all(raw, ebits, mbits, has_inf):
    out = np.empty(raw.size, np.float64)
    for i in range(raw.size):
        out[i] = decode_bits(raw[i], ebits, mbits, has_inf)
    return out


@ALL_CODECS
def test_compiled_decode_bits_matches_ml_dtypes_for_every_pattern(codec):
    got = _decode_all(all_patterns(codec), *format_of(codec))
    assert np.array_equal(got.astype(np.float32).astype(np.float64), got, equal_nan=True), "decode is not exact"
    assert_same_floats(got.astype(np.float32), expected_decode(codec), "compiled decode_bits")


@njit
def _decode_rows(src, dst, codec):
    decode_rows(src, dst, codec)


@ALL_CODECS
def test_cpu_decode_rows_matches_ml_dtypes_for_every_pattern(codec):
    raw = all_patterns(codec)
    src = raw.reshape(-1, 64)[:, ::-1].copy()       # rows as the kernels pass them
    dst = np.full(src.shape, np.nan, np.float32)
    _decode_rows(src, dst, codec)
    assert_same_floats(dst[:, ::-1].ravel(), expected_decode(codec), "decode_rows")


@njit
def _f16_to_f32_all(raw):
    out = np.empty(raw.size, np.float32)
    for i in range(raw.size):
        out[i] = _f16_to_f32(raw[i])
    return out


def test_cpu_f16_to_f32_matches_numpy_for_every_pattern():
    assert_same_floats(_f16_to_f32_all(all_patterns(F16)), expected_decode(F16), "_f16_to_f32")


@njit
def _widen_all(raw, codec):
    out = np.empty(raw.size, np.float64)
    for i in range(raw.size):
        out[i] = widen(raw[i], codec)
    return out


@ALL_CODECS
def test_widen_decodes_every_pattern(codec):
    assert_same_floats(_widen_all(all_patterns(codec), codec).astype(np.float32), expected_decode(codec), "widen")


# --- encoding --------------------------------------------------------------------


def encode_inputs(codec, seed=0):
    """float32 values that probe round-to-nearest-even into codec.

    Every finite value, every halfway point between neighbours (ties), one
    float32 ulp either side of each tie, the overflow boundary, values below
    the smallest subnormal, float32 subnormals, +-0, +-inf, NaN and random
    float32 bit patterns.
    """
    dtype, _ = FORMATS[codec]
    values = np.unique(expected_decode(codec).astype(np.float64))
    values = values[np.isfinite(values) & (values >= 0)]
    top = values[-1]
    step = values[-1] - values[-2]           # ulp at the top: the next value would be top + step
    ties = (values[:-1] + values[1:]) / 2
    edges = np.array([top + step / 2, top + step, 2 * top, values[1] / 2, values[1] / 4, values[1] * 0.75])
    points = np.concatenate([values, ties, edges]).astype(np.float32)
    assert np.array_equal(points[: len(values) + len(ties)].astype(np.float64),
                          np.concatenate([values, ties])), "ties must be exact in float32"
    near = np.concatenate([points, np.nextafter(points, np.float32(np.inf)), np.nextafter(points, np.float32(0))])
    rng = np.random.default_rng(seed)
    random_bits = rng.integers(0, 2 ** 32, size=50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f32 = np.finfo(np.float32)
    special = np.array([0.0, np.inf, np.nan, f32.max, f32.smallest_subnormal, f32.smallest_normal,
                        f32.smallest_normal / 3], np.float32)
    x = np.concatenate([near, -near, random_bits, special, -special])
    if codec == BF16:
        # every bf16 pattern in the high half with low halves around the tie at 0x8000
        high = np.arange(2 ** 16, dtype=np.uint32) << 16
        low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
        x = np.concatenate([x, (high[:, None] | low[None, :]).ravel().view(np.float32)])
    return x


def expected_encode(x, codec, saturate):
    """Bits that NumPy / ml_dtypes give, with fastattn's saturation applied on top."""
    dtype, bits = FORMATS[codec]
    raw = x.astype(dtype).view(bits).copy()
    ebits, mbits, has_inf = format_of(codec)
    if saturate or not has_inf:
        # ml_dtypes gives inf (e5m2) or NaN (e4m3fn) on overflow; saturation gives the largest finite value
        finite_max = np.abs(expected_decode(codec)[np.isfinite(expected_decode(codec))]).max()
        overflow = ~np.isnan(x) & ~np.isfinite(raw.view(dtype).astype(np.float32))
        max_bits = np.array(finite_max, np.float32).astype(dtype).view(bits)
        sign = np.signbit(x).astype(bits) << (ebits + mbits)
        raw = np.where(overflow, sign | max_bits, raw).astype(bits)
    return raw


ENCODE_MODES = [(F16, False), (BF16, False), (E4M3, True), (E5M2, True), (E5M2, False)]
ENCODE_IDS = [f"{NAMES[c]}-{'saturate' if s else 'inf'}" for c, s in ENCODE_MODES]


@njit
def _encode_all(x, ebits, mbits, has_inf, saturate):
    out = np.empty(x.size, np.int64)
    for i in range(x.size):
        out[i] = encode_bits(x[i], ebits, mbits, has_inf, saturate)
    return out


@pytest.mark.parametrize("codec, saturate", ENCODE_MODES, ids=ENCODE_IDS)
@pytest.mark.parametrize("precision", [np.float32, np.float64], ids=["from-f32", "from-f64"])
def test_compiled_encode_bits_rounds_to_nearest_even(codec, saturate, precision):
    x = encode_inputs(codec)
    got = _encode_all(x.astype(precision), *format_of(codec), saturate)
    assert_same_bits(got, expected_encode(x, codec, saturate), codec, "compiled encode_bits", x)


@pytest.mark.parametrize("codec, saturate", ENCODE_MODES, ids=ENCODE_IDS)
def test_encode_array_rounds_to_nearest_even(codec, saturate):
    x = encode_inputs(codec)[::5]       # plain Python: a fifth of the values keeps it quick
    got = encode_array(x, codec, saturate=saturate)
    assert got.dtype == FORMATS[codec][1] and got.shape == x.shape
    assert_same_bits(got, expected_encode(x, codec, saturate), codec, "encode_array", x)


def test_encode_array_keeps_shape():
    x = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
    got = encode_array(x, F16, saturate=False)
    assert got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(decode_array(got, F16), x.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("codec, value, expected", [
    (E4M3, 448.0, 448.0), (E4M3, 449.0, 448.0), (E4M3, 464.0, 448.0), (E4M3, 1e6, 448.0), (E4M3, np.inf, 448.0),
    (E4M3, -500.0, -448.0), (E4M3, -np.inf, -448.0),
    (E5M2, 57344.0, 57344.0), (E5M2, 61440.0, 57344.0), (E5M2, 1e9, 57344.0), (E5M2, -np.inf, -57344.0),
], ids=lambda v: f"{v}" if not isinstance(v, int) else NAMES[v])
def test_fp8_encode_saturates(codec, value, expected):
    got = decode_array(encode_array(np.array([value]), codec, saturate=True), codec)[0]
    assert got == expected
    compiled = _encode_all(np.array([value]), *format_of(codec), True)
    assert decode_array(compiled.astype(np.uint8), codec)[0] == expected


def test_nan_stays_nan_in_every_format():
    for codec in FORMATS:
        for saturate in (False, True):
            assert np.isnan(decode_array(encode_array(np.array([np.nan]), codec, saturate=saturate), codec)[0])


@njit
def _f32_to_bf16_all(x):
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = _f32_to_bf16(x[i])
    return out


def test_cpu_f32_to_bf16_rounds_to_nearest_even():
    x = encode_inputs(BF16)
    assert_same_bits(_f32_to_bf16_all(x), expected_encode(x, BF16, False), BF16, "_f32_to_bf16", x)


@njit
def _encode_rows(src, dst, codec):
    for r in range(src.shape[0]):
        encode_row(src[r], dst[r], codec)


@ALL_CODECS
@pytest.mark.parametrize("precision", [np.float32, np.float64], ids=["from-f32", "from-f64"])
def test_cpu_encode_row_rounds_to_nearest_even(codec, precision):
    """Half formats round like NumPy / ml_dtypes; fp8 (always stored saturating) likewise, then saturates."""
    x = encode_inputs(codec)
    x = x[: x.size - x.size % 64]
    dst = np.zeros((x.size // 64, 64), FORMATS[codec][1])
    _encode_rows(x.astype(precision).reshape(-1, 64), dst, codec)
    assert_same_bits(dst.ravel(), expected_encode(x, codec, codec in (E4M3, E5M2)), codec, "encode_row", x)


@njit
def _narrow_all(x, codec):
    out = np.empty(x.size, np.float64)
    for i in range(x.size):
        out[i] = narrow(x[i], codec)
    return out


@pytest.mark.parametrize("codec, saturate", [(F16, False), (BF16, False), (E4M3, True), (E5M2, True)],
                         ids=lambda v: NAMES.get(v, str(v)) if not isinstance(v, bool) else "")
def test_narrow_encodes_like_encode_bits(codec, saturate):
    x = encode_inputs(codec)[::7]
    got = _narrow_all(x.astype(np.float64), codec)
    assert np.array_equal(got, np.round(got)), "narrow must return whole numbers (the bits)"
    assert_same_bits(got.astype(np.int64), expected_encode(x, codec, saturate), codec, "narrow", x)


@njit
def _decode_tokens(src, dst, codec):
    for c in range(dst.shape[1]):
        decode_token(src, c * dst.shape[0], dst, c, codec)


@ALL_CODECS
def test_cpu_decode_token_matches_ml_dtypes_for_every_pattern(codec):
    """The paged gather's decode: one token's KV-head rows into a [heads, tokens, D] tile."""
    raw = all_patterns(codec)
    heads, dim = 2, 16
    src = raw.reshape(-1, dim)                              # rows (token, head) of the cache
    dst = np.full((heads, src.shape[0] // heads, dim), np.nan, np.float32)
    _decode_tokens(src, dst, codec)
    assert_same_floats(dst.transpose(1, 0, 2).ravel(), expected_decode(codec), "decode_token")
