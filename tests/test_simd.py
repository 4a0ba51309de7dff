"""The explicit-vector loads of the CPU decode kernel convert every storage format exactly."""
import ml_dtypes
import numpy as np
import pytest
from numba import njit

from fastattn.cpu._simd import LANES, simd_view, vadd, vfma, vload, vsplat, vstore, vsum, vsums8, vzero


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


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2],
                         ids=lambda d: np.dtype(d).name)
def test_every_bit_pattern_loads_as_numpy_converts_it(dtype):
    width = np.uint16 if np.dtype(dtype).itemsize == 2 else np.uint8
    x = np.arange(np.iinfo(width).max + 1, dtype=width).view(dtype)
    got = np.empty(x.size, np.float32)
    _load_all(simd_view(x), got)
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


def test_sums_of_eight_vectors_in_order(rng):
    @njit
    def sums(a):
        return vsums8(vload(a[0], 0), vload(a[1], 0), vload(a[2], 0), vload(a[3], 0),
                      vload(a[4], 0), vload(a[5], 0), vload(a[6], 0), vload(a[7], 0))

    a = rng.standard_normal((8, LANES)).astype(np.float32)
    assert np.allclose(sums(a), a.astype(np.float64).sum(axis=1), rtol=1e-5, atol=1e-6)


def test_add_adds_lane_by_lane(rng):
    @njit
    def add(a, b, out):
        vstore(out, 0, vadd(vload(a, 0), vload(b, 0)))

    a, b = rng.standard_normal((2, LANES)).astype(np.float32)
    out = np.empty(LANES, np.float32)
    add(a, b, out)
    assert np.array_equal(out, a + b)
