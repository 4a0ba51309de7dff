"""Shared test helpers: the tolerance table, ``assert_close`` and the ``device`` fixture.

Run the CPU suite with ``pytest -m "not cuda"`` and the CUDA suite with
``NUMBA_ENABLE_CUDASIM=1 pytest -m cuda`` (the simulator must be switched on
before numba is imported, hence two invocations).  On a machine with a GPU the
second command without the variable runs the same tests on the hardware.
"""
import os
import zlib
from dataclasses import dataclass

import ml_dtypes
import numba
import numpy as np
import pytest
from numba import cuda

import fastattn

BF16 = np.dtype(ml_dtypes.bfloat16)

#: Largest allowed ``max|got - ref| / max(max|ref|, magnitude)`` per array, by input dtype.
#: float16/bfloat16 are 4 and 3 units of their rounding error (2**-11, 2**-8): the
#: kernels accumulate in float32, so the output rounding and the rounded ``out``
#: that enters ``delta`` in the backward dominate.  float32 (~170 units of 2**-23)
#: and float64 (~4500 units of 2**-52) leave room for sums over thousands of keys.
#: The errors seen on the test grid stay 4 or more times below these;
#: ``test_tolerances_catch_bugs`` checks that a wrong scale, a dropped key, a
#: wrong mask or a wrong GQA head map stays outside every entry.
TOLERANCE = {
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 2e-5,
    np.dtype(np.float16): 2e-3,
    BF16: 1.2e-2,
}

#: CUDA launch config for the simulator, which runs every GPU thread as a Python thread.
#: The tensor-core forward meets at a barrier for every ``mma``: under the simulator it is tested by
#: tests/test_mma.py on this suite's own float16/bfloat16 cases (one warp a block), and off here.
CUDA_TEST_CONFIG = dict(cuda_threads=8, cuda_tiles=(2, 2, 2, 4), cuda_max_head_dim=16, cuda_paged_rows=4,
                        cuda_paged_block_k=4, cuda_paged_threads=8, cuda_split_min_keys=5, cuda_proj_tile=4,
                        cuda_mma=False, cuda_mma_warps=1)

CUDA = pytest.mark.cuda


def use_test_cuda_config(monkeypatch):
    """Shrink the CUDA launch config to :data:`CUDA_TEST_CONFIG` for this test (undone after it).

    ``FASTATTN_TEST_CUDA_CONFIG=default`` keeps the package's own config, so that
    on a real GPU the same tests check the kernels as users launch them
    (``scripts/gpu_check.sh`` runs the suite both ways).
    """
    if os.environ.get("FASTATTN_TEST_CUDA_CONFIG", "small") == "default":
        return
    for name, value in CUDA_TEST_CONFIG.items():
        monkeypatch.setattr(fastattn.config, name, value)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: runs CUDA kernels (a GPU, or NUMBA_ENABLE_CUDASIM=1 set before numba is imported)")


def cuda_unavailable_reason():
    """Why CUDA tests cannot run here, or None when they can."""
    if numba.config.ENABLE_CUDASIM or cuda.is_available():
        return None
    return "no CUDA GPU and NUMBA_ENABLE_CUDASIM=1 not set (set it before Python starts)"


def host(x):
    """A NumPy array of a result, from the CPU or from a CUDA device array."""
    if isinstance(x, np.ndarray):
        return x
    return x.copy_to_host()


def assert_close(got, ref, dtype, name="array", magnitude=0.0):
    """Assert ``got`` (any device, any float dtype) matches the float64 ``ref``.

    The error is ``max|got - ref|`` over the finite entries of ``ref``, scaled by
    ``max(max|ref|, magnitude)``.  ``magnitude`` is for sums that cancel: the
    largest sum of absolute terms, which is what rounding errors scale with (a
    gradient of a row that sees one key is exactly 0, but computed as a - a).
    Infinite entries of ``ref`` (``lse = -inf`` of a row that sees no key) must
    be equal in ``got``, and ``got`` may hold no NaN.
    """
    got = np.asarray(host(got)).astype(np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN at {np.argwhere(np.isnan(got))[:5].tolist()}"
    finite = np.isfinite(ref)
    bad = ~finite & (got != ref)
    assert not bad.any(), (f"{name}: expected {ref[bad][:5]} at {np.argwhere(bad)[:5].tolist()}, "
                           f"got {got[bad][:5]}")
    if not finite.any():
        return
    err = np.where(finite, np.abs(got - np.where(finite, ref, 0.0)), 0.0)
    scale = max(np.abs(ref[finite]).max(), magnitude, np.finfo(np.float64).tiny)
    tol = TOLERANCE[np.dtype(dtype)]
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err[worst] <= tol * scale, (
        f"{name}: max error {err[worst]:.3g} = {err[worst] / scale:.3g} x max(max|ref|, magnitude) "
        f"(tolerance {tol:g} for {np.dtype(dtype)}) at {tuple(map(int, worst))}: "
        f"got {got[worst]!r}, expected {ref[worst]!r}")


@dataclass(frozen=True)
class Device:
    """Moves test inputs to where the kernels under test run, and results back."""

    name: str

    def put(self, x):
        """A CPU array stays as it is; on CUDA it becomes a device array (None stays None)."""
        if self.name == "cpu" or x is None:
            return x
        x = np.ascontiguousarray(x)
        # numba knows no ml_dtypes (bfloat16, fp8; float8_e5m2's kind is even "f"): move the bits, then view them
        bits = fastattn._dtypes.bits_view(x) if x.dtype.kind in "fV" else x
        dev = cuda.to_device(bits)
        return dev if bits.dtype == x.dtype else dev.view(x.dtype)

    def get(self, x):
        """The NumPy array of a result, checking that it lives on this device."""
        if self.name == "cpu":
            assert isinstance(x, np.ndarray), f"expected a NumPy array, got {type(x).__name__}"
            return x
        assert not isinstance(x, np.ndarray), "expected a CUDA device array, got a NumPy array"
        return x.copy_to_host()


def on_devices(cpu_cases, cuda_cases):
    """``pytest.param`` rows ``(device, case)`` for ``parametrize(..., indirect=["device"])``.

    CUDA rows are marked ``cuda`` and usually smaller: the simulator is slow.
    """
    rows = [pytest.param("cpu", case, id=f"cpu-{case_id(case)}") for case in cpu_cases]
    rows += [pytest.param("cuda", case, id=f"cuda-{case_id(case)}", marks=CUDA) for case in cuda_cases]
    return rows


def case_id(case):
    return getattr(case, "id", None) or str(case)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA)])
def device(request, monkeypatch):
    """Where the kernels run: "cpu" (NumPy arrays) or "cuda" (numba device arrays).

    For CUDA the launch config is shrunk for the simulator and restored afterwards.
    """
    if request.param == "cuda":
        reason = cuda_unavailable_reason()
        if reason:
            pytest.skip(reason)
        use_test_cuda_config(monkeypatch)
    return Device(request.param)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so every case has its own fixed inputs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
