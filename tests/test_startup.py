"""``import fastattn`` stays light: ml_dtypes, dask and the CUDA modules load when a call needs them."""
import subprocess
import sys

import numpy as np

from fastattn import _dtypes

LAZY = ("ml_dtypes", "dask", "numba.cuda", "fastattn.cuda", "fastattn.dask")


def test_import_loads_no_optional_module():
    code = f"import sys, fastattn; print([m for m in {LAZY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"import fastattn loaded {done.stdout.strip()}"


def test_dtypes_are_recognised_by_name_without_ml_dtypes():
    import ml_dtypes

    assert [_dtypes.codec_of(d) for d in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16,
                                          ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)] == [
        _dtypes.NATIVE, _dtypes.NATIVE, _dtypes.F16, _dtypes.BF16, _dtypes.E4M3, _dtypes.E5M2]
    assert _dtypes.is_float(ml_dtypes.bfloat16) and not _dtypes.is_float(ml_dtypes.float8_e4m3fn)
    assert _dtypes.is_fp8(ml_dtypes.float8_e5m2) and not _dtypes.is_fp8(np.float16)
    assert not _dtypes.is_float(np.dtype(">f4")), "a byte-swapped float32 is not what the kernels read"
    assert not _dtypes.is_float(np.int16) and not _dtypes.is_fp8(np.uint8)


def test_fp8_table_matches_ml_dtypes():
    import ml_dtypes

    want = np.stack([np.arange(256, dtype=np.uint8).view(d).astype(np.float32)
                     for d in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)])
    np.testing.assert_array_equal(_dtypes.FP8_TABLE, want)
