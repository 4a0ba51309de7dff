"""airspeed velocity benchmarks of the paged attention family.

The cases, inputs, kernels and NumPy peers come from :mod:`fastattn.bench.paged`,
the module behind the paged table of ``python -m fastattn bench``.  Decode
runs at the issue's shape (B=8, context 4096, Hq=32, Hkv=8, D=128, block 16);
``track_read_bandwidth`` records the machine's read bandwidth in the same run
so that a decode time converts into a fraction of it.  CUDA classes raise
``NotImplementedError`` in ``setup`` (asv reports them as skipped) unless a
real GPU is present.
"""
import numpy as np

import fastattn
from fastattn.bench import core as bench_core, paged as bench_paged

_FULL = bench_paged.SIZES["full"]
_BASE = dict(batch=_FULL["batch"], context=_FULL["context"], heads_q=_FULL["heads_q"],
             heads_kv=_FULL["heads_kv"], head_dim=_FULL["head_dim"])


class _Paged:
    backend = "cpu"

    def _prepare(self, case):
        self.case = case
        self.x = bench_paged.make_inputs(case, backend=self.backend)
        self.run = bench_paged.kernel(case, self.x)
        self.sync = bench_core.cuda_sync if self.backend == "cuda" else (lambda: None)
        self.run()  # compile (or load the cache) and warm up
        self.sync()

    def _time(self):
        self.run()
        self.sync()


class TimePagedDecode(_Paged):
    """One decode step over the paged cache (f16, f32, fp8 e4m3) and over the same keys held dense."""

    params = (["float16", "float32", "float8_e4m3fn"], ["paged", "dense"])
    param_names = ["dtype", "layout"]
    timeout = 300

    def setup(self, dtype, layout):
        if layout == "dense" and dtype.startswith("float8"):
            raise NotImplementedError("dense attention takes no fp8 keys")
        self._prepare(bench_paged.PagedCase("decode" if layout == "paged" else "dense decode", dtype, **_BASE))
        self.peer = bench_paged.peer(self.case, self.x)

    def time_decode(self, dtype, layout):
        self._time()

    def peakmem_decode(self, dtype, layout):
        self.run()

    def time_numpy_peer(self, dtype, layout):
        """Fancy-indexing gather + plain NumPy attention on the same cache."""
        self.peer()


class TimePagedLongContext(_Paged):
    """B=1 decode over a 32k-token context: split-KV spreads it over the cores (threads=1 for contrast)."""

    params = ([0, 1],)
    param_names = ["threads"]
    timeout = 300

    def setup(self, threads):
        self._prepare(bench_paged.PagedCase("decode", "float16", threads=threads,
                                             **dict(_BASE, batch=1, context=_FULL["long_context"])))
        from numba import get_num_threads, set_num_threads

        self._threads = get_num_threads()
        if threads:
            set_num_threads(threads)

    def teardown(self, threads):
        from numba import set_num_threads

        set_num_threads(self._threads)

    def time_decode(self, threads):
        self._time()


class TimePagedPrefill(_Paged):
    """A causal prefill chunk of 512 queries at the end of a 4096-token sequence (f16)."""

    timeout = 300

    def setup(self):
        self._prepare(bench_paged.PagedCase("prefill", "float16", seq_q=_FULL["chunk"], **dict(_BASE, batch=1)))

    def time_prefill(self):
        self._time()

    def peakmem_prefill(self):
        self.run()


class TimePagedBackward(_Paged):
    """Backward of a causal chunk of 128 queries over 1024 keys, B=2, f32 (dk/dv into the whole cache)."""

    timeout = 300

    def setup(self):
        self._prepare(bench_paged.PagedCase("backward", "float32", seq_q=_FULL["chunk"] // 4,
                                             **dict(_BASE, batch=2, context=_FULL["context"] // 4)))
        x = self.x
        args = (x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"])
        slopes = np.linspace(0.01, 0.2, x["q"].shape[1], dtype=np.float32)
        options = dict(causal=True, softcap=30.0, alibi_slopes=bench_core.to_device(slopes)
                       if self.backend == "cuda" else slopes)
        out, lse = fastattn.paged_attention(*args, return_lse=True, **options)
        self.run_options = lambda: fastattn.paged_attention_backward(x["dout"], *args[:3], out, lse, *args[3:],
                                                                     **options)
        self.run_options()
        self.sync()

    def time_backward(self):
        self._time()

    def time_backward_softcap_alibi(self):
        """The same backward with softcap and ALiBi (their gradients inside the same pass)."""
        self.run_options()
        self.sync()

    def peakmem_backward(self):
        self.run()


class TimeWriteKVCache(_Paged):
    """Writing 8 x 512 new tokens into the paged cache (f16, and fp8 with quantisation)."""

    params = (["float16", "float8_e4m3fn"],)
    param_names = ["dtype"]

    def setup(self, dtype):
        self._prepare(bench_paged.PagedCase("write", dtype, seq_q=_FULL["chunk"], **_BASE))
        self.peer = bench_paged.peer(self.case, self.x)

    def time_write(self, dtype):
        self._time()

    def peakmem_write(self, dtype):
        self.run()

    def time_numpy_peer(self, dtype):
        """Fancy-indexed assignment of the same rows (NumPy's cast, no saturation)."""
        self.peer()


class TrackReadBandwidth:
    """This machine's read bandwidth (GB/s), the yardstick of decode."""

    unit = "GB/s"
    timeout = 300

    def track_read_bandwidth(self):
        return bench_paged.read_bandwidth(512)


class TimePagedDecodeCUDA(bench_core.CUDAOnly, TimePagedDecode):
    """TimePagedDecode on device arrays (synchronised after every call)."""


class TimePagedPrefillCUDA(bench_core.CUDAOnly, TimePagedPrefill):
    """TimePagedPrefill on device arrays."""


class TimePagedBackwardCUDA(bench_core.CUDAOnly, TimePagedBackward):
    """TimePagedBackward on device arrays."""
