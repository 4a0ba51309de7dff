"""The explicit-vector helpers of the CPU decode kernel: exact conversions, sums, exponentials."""
import ml_dtypes
import numpy as np
import pytest
from numba import njit

from fastattn.cpu._fastmath import exp_nonpos, exp_row, max_of
from fastattn.cpu._simd import (E4M3_SCALE, LANES, data_of, line_elements, simd_view, vadd, vexp_nonpos, vfma, vlane,
                                vload, vload2, vmax_lanes, vsplat, vstore, vstore4, vsum, vsums16, vzero)


@njit
def _load_all(src, dst):
    for i in range(0, src.size, LANES):
        vstore(dst, i, vload(src, i))


@njit
def _dot(a, b):
    acc = vzero()
    for i in range(0, a.size, LANES):
        acc = vfma(vload(a, i), vload(b, i), acc)
    return vsum(acc)


@njit
def _load_pairs_through_pointer(src, dst):
    p, q = data_of(src), data_of(dst)
    for i in range(0, src.size, 2 * LANES):
        low, high = vload2(p, i)
        vstore(q, i, low)
        vstore(q, i + LANES, high)


@pytest.mark.parametrize("load", [_load_all, _load_pairs_through_pointer], ids=["vload", "vload2-pointer"])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2],
                         ids=lambda d: np.dtype(d).name)
def test_every_bit_pattern_loads_as_numpy_converts_it(dtype, load):
    width = np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint8
    x = np.arange(np.iinfo(width).max + 1, dtype=width).view(dtype)
    got = np.empty(x.size, np.float32)
    load(simd_view(x), got)
    if dtype == ml_dtypes.float8_e4m3fn:
        got *= E4M3_SCALE  # e4m3 loads give the value times 2**-8; scaling back is exact
    want = x.astype(np.float32)
    assert np.array_equal(got, want, equal_nan=True)
    assert np.array_equal(np.signbit(got), np.signbit(want))


def test_float32_loads_stores_and_sums(rng):
    a, b = rng.standard_normal((2, 128)).astype(np.float32)
    got = np.empty(128, np.float32)
    _load_all(a, got)
    assert np.array_equal(got, a)
    assert _dot(a, b) == pytest.approx(float(a.astype(np.float64) @ b), rel=1e-5)


def test_splat_fills_every_lane():
    @njit
    def splat(x, out):
        vstore(out, 0, vsplat(x))

    out = np.zeros(LANES, np.float32)
    splat(np.float32(2.5), out)
    assert np.all(out == 2.5)


def test_sums_of_sixteen_vectors_in_order_and_quarter_stores(rng):
    @njit
    def sums(a, out, lanes):
        p = data_of(a)
        v = vsums16(vload(p, 0), vload(p, 16), vload(p, 32), vload(p, 48), vload(p, 64), vload(p, 80),
                    vload(p, 96), vload(p, 112), vload(p, 128), vload(p, 144), vload(p, 160), vload(p, 176),
                    vload(p, 192), vload(p, 208), vload(p, 224), vload(p, 240))
        vstore4(out[0], 0, v, 0)
        vstore4(out[0], 4, v, 1)
        vstore4(out[1], 0, v, 2)
        vstore4(out[1], 4, v, 3)
        for k in range(LANES):
            lanes[k] = vlane(v, k)

    a = rng.standard_normal((16, LANES)).astype(np.float32)
    out = np.zeros((2, 8), np.float32)
    lanes = np.zeros(LANES, np.float32)
    sums(a, out, lanes)
    want = a.astype(np.float64).sum(axis=1)
    assert np.allclose(lanes, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(out.ravel(), lanes)


def test_vector_exp_matches_the_scalar_one_and_numpy():
    @njit
    def both(x, vec_out, scalar_out):
        for i in range(0, x.size, LANES):
            vstore(vec_out, i, vexp_nonpos(vload(x, i)))
        for i in range(x.size):
            scalar_out[i] = exp_nonpos(x[i])

    x = np.concatenate([-np.geomspace(1e-8, 100, 4000), [0.0, -0.0, -86.9, -87.1, -np.inf, np.nan]])
    x = np.resize(x, -(-x.size // LANES) * LANES).astype(np.float32)
    vec, scalar = np.empty_like(x), np.empty_like(x)
    both(x, vec, scalar)
    np.testing.assert_array_max_ulp(vec, scalar, maxulp=1)  # the two round their FMAs differently
    assert np.array_equal(vec == 0, scalar == 0)  # NaN and x < -87 give 0 in both
    want = np.exp(x.astype(np.float64))
    near = np.isfinite(x) & (x > -5)
    assert np.allclose(vec[near], want[near], rtol=5e-7, atol=0)
    # further out the rounding of x * log2(e) grows with |x| (weights below e**-5 of the maximum)
    far = np.isfinite(x) & (x > -80)
    assert np.allclose(vec[far], want[far], rtol=1e-5, atol=0)
    assert np.all(vec[(x < -87.0) | np.isnan(x)] == 0)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 128, 131])
def test_row_max_and_exp_vector_paths_match_scalar_ones(rng, n):
    @njit
    def run(row):
        best = max_of(row)
        total = exp_row(row, best)
        return best, total

    x = rng.standard_normal(n).astype(np.float32)
    best, total = run(x.copy())
    best64, total64 = run(x.astype(np.float64))
    assert best == x.max() == best64
    assert total == pytest.approx(total64, rel=1e-6)


def test_lane_max_finds_the_largest(rng):
    @njit
    def largest(a):
        return vmax_lanes(vload(a, 0))

    a = rng.standard_normal(LANES).astype(np.float32)
    for k in range(LANES):
        b = a.copy()
        b[k] = 10.0
        assert largest(b) == 10.0


def test_add_adds_lane_by_lane(rng):
    @njit
    def add(a, b, out):
        vstore(out, 0, vadd(vload(a, 0), vload(b, 0)))

    a, b = rng.standard_normal((2, LANES)).astype(np.float32)
    out = np.empty(LANES, np.float32)
    add(a, b, out)
    assert np.array_equal(out, a + b)


@njit
def _line_elements_of(x):
    return line_elements(x), line_elements(data_of(x))


@pytest.mark.parametrize("dtype, count", [(np.float64, 8), (np.float32, 16), (np.uint16, 32), (np.int8, 64)])
def test_line_elements_counts_a_64_byte_line_for_arrays_and_pointers(dtype, count):
    assert _line_elements_of(np.zeros(4, dtype)) == (count, count)
