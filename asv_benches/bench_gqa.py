"""airspeed velocity benchmarks of the GQA utilities: repeat_kv and its backward against NumPy."""
import numpy as np

import fastattn
from fastattn.bench import core as bench_core


class TimeRepeatKV:
    """repeat_kv / repeat_kv_backward on [B=4, Hkv=8, S=2048, D=128] with group size 4."""

    params = (["float32", "bfloat16"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        rng = np.random.default_rng(0)
        self.kv = rng.standard_normal((4, 8, 2048, 128), np.float32).astype(bench_core.numpy_dtype(dtype))
        self.dkv = rng.standard_normal((4, 32, 2048, 128), np.float32).astype(self.kv.dtype)
        fastattn.repeat_kv(self.kv, 4)
        fastattn.repeat_kv_backward(self.dkv, 4)

    def time_repeat_kv(self, dtype):
        fastattn.repeat_kv(self.kv, 4)

    def time_numpy_repeat(self, dtype):
        np.repeat(self.kv, 4, axis=1)

    def time_repeat_kv_backward(self, dtype):
        fastattn.repeat_kv_backward(self.dkv, 4)

    def time_numpy_backward(self, dtype):
        self.dkv.astype(np.float32).reshape(4, 8, 4, 2048, 128).sum(axis=2).astype(self.dkv.dtype)

    def peakmem_repeat_kv(self, dtype):
        fastattn.repeat_kv(self.kv, 4)
