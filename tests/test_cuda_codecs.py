"""The CUDA kernels' element codecs (fastattn/cuda/_device.py) against ml_dtypes, every bit pattern.

bfloat16 widens by a shift and narrows by a round-to-nearest-even on the bits;
fp8 is decoded and encoded by arithmetic on the bits, saturating.  Run through
a kernel, so the simulator checks the same code a GPU compiles.
"""
import ml_dtypes
import numpy as np
import pytest

from numba import cuda

from conftest import CUDA, cuda_unavailable_reason

pytestmark = CUDA

FORMATS = {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
           "float8_e5m2": ml_dtypes.float8_e5m2, "float16": np.float16}


@pytest.fixture
def device():
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _run(fn, src, dst):
    kernel = cuda.jit(fn)
    d_src, d_dst = cuda.to_device(src), cuda.to_device(dst)
    kernel[(src.size + 255) // 256, 256](d_src, d_dst)
    return d_dst.copy_to_host()


def _bits(name):
    dtype = np.dtype(FORMATS[name])
    if dtype == np.float16:
        return np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    return np.arange(1 << (8 * dtype.itemsize), dtype=np.uint16 if dtype.itemsize == 2 else np.uint8)


@pytest.mark.parametrize("name", FORMATS)
def test_load_widens_every_pattern_exactly(device, name):
    from fastattn.cuda import _device

    load = _device.codec(FORMATS[name])[0]

    def widen(src, dst):
        i = cuda.grid(1)
        if i < src.size:
            dst[i] = load(src[i])

    raw = _bits(name)
    got = _run(widen, raw, np.zeros(raw.size, np.float32))
    want = raw.view(FORMATS[name]).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))  # signed zeros too


@pytest.mark.parametrize("name", FORMATS)
def test_store_rounds_to_nearest_even(device, name, rng):
    from fastattn.cuda import _device

    store = _device.codec(FORMATS[name])[1]

    def narrow(src, dst):
        i = cuda.grid(1)
        if i < src.size:
            dst[i] = store(src[i])

    dtype = np.dtype(FORMATS[name])
    grid = _bits(name).view(dtype).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    # every value, the midpoints between neighbours (ties) and random values across the range
    ordered = np.unique(grid)
    mids = (ordered[:-1].astype(np.float64) + ordered[1:]) / 2
    top = float(np.abs(ordered).max())
    span = 1.2 * top if dtype.itemsize == 1 else top  # past the range: only fp8 (saturating) is asked to round
    values = np.concatenate([grid, mids.astype(np.float32), rng.uniform(-span, span, 4000).astype(np.float32),
                             np.float32([np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30])])
    out = np.zeros(values.size, dtype if dtype == np.float16 else _bits(name).dtype)
    got = _run(narrow, values, out).view(dtype).astype(np.float32)
    if dtype.itemsize == 1:  # fastattn's fp8 stores saturate (inf and overflow give the largest finite value)
        want = np.clip(values, -top, top).astype(dtype).astype(np.float32)
    else:
        want = values.astype(dtype).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    nan = np.float32([np.nan])
    assert np.isnan(_run(narrow, nan, out[:1]).view(dtype).astype(np.float32)).all()
