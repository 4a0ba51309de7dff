"""airspeed velocity benchmarks of the dense attention kernels.

The cases, inputs, kernels and NumPy peer come from :mod:`fastattn.bench.dense`,
the module behind ``python -m fastattn bench``, so both measure the same
thing.  Inputs and a warm-up call live in ``setup``; compile time is measured
on its own by the ``time_compile_*`` benchmarks.  CUDA classes raise
``NotImplementedError`` in ``setup`` (asv reports them as skipped) unless a
real GPU is present.
"""
import os
import subprocess
import sys
import tempfile

from fastattn.bench import core as bench_core, dense as bench_dense, masked as bench_masked

_SEQ = list(bench_dense.ASV_SEQ_LENS)


class _Runs:
    """Set-up shared by the timing classes: one prepared callable per named operation."""

    backend = "cpu"

    def _prepare(self, cases):
        sync = bench_core.cuda_sync if self.backend == "cuda" else (lambda: None)
        self.sync = sync
        self.runs, self.inputs = {}, {}
        for name, case in cases.items():
            self.inputs[name] = bench_dense.make_inputs(case, self.backend)
            self.runs[name] = bench_dense.kernel(case, self.inputs[name])
            self.runs[name]()  # compile (or load from the cache) and warm up
            sync()

    def _time(self, name):
        self.runs[name]()
        self.sync()


class TimeAttention(_Runs):
    """Forward, causal forward and causal backward, B=1, H=8, D=64, over dtype x N."""

    params = (list(bench_dense.DTYPES), _SEQ)
    param_names = ["dtype", "seq"]
    timeout = 300  # the float16 NumPy peer has no BLAS: ~20 s per call at N=2048 on 2 cores

    def setup(self, dtype, seq):
        self._prepare({
            "forward": bench_dense.Case("forward", dtype=dtype, seq=seq),
            "forward_causal": bench_dense.Case("forward", dtype=dtype, seq=seq, causal=True),
            "backward": bench_dense.Case("backward", dtype=dtype, seq=seq, causal=True),
        })
        case = bench_dense.Case("forward", dtype=dtype, seq=seq)
        self.peer = bench_dense.peer(case, self.inputs["forward"])

    def time_forward(self, dtype, seq):
        self._time("forward")

    def time_forward_causal(self, dtype, seq):
        self._time("forward_causal")

    def time_backward(self, dtype, seq):
        self._time("backward")

    def time_numpy_peer(self, dtype, seq):
        """fastattn.reference.naive_attention on the same inputs: time_forward / this = speed-up."""
        self.peer()


class TimeAttentionGQA(_Runs):
    """Causal float32 forward and backward with Hq=8 over Hkv KV heads (MHA, GQA, MQA)."""

    params = ([8, 2, 1],)
    param_names = ["heads_kv"]

    def setup(self, heads_kv):
        seq = bench_dense.ASV_SEQ_LENS[-1]
        self._prepare({op: bench_dense.Case(op, seq=seq, causal=True, heads_kv=heads_kv)
                       for op in ("forward", "backward")})

    def time_forward(self, heads_kv):
        self._time("forward")

    def time_backward(self, heads_kv):
        self._time("backward")


class MemForwardLong:
    """Peak memory of a one-head forward at N=16384, D=64: must stay linear in N.

    q, k, v and out are 4 MiB each; a materialised score matrix would be 1 GiB.
    The number is the whole process's peak (interpreter, NumPy, numba included).
    """

    timeout = 300

    def setup(self):
        case = bench_dense.Case("forward", seq=bench_dense.LONG_SEQ, heads_q=1, heads_kv=1)
        small = bench_dense.Case("forward", seq=256, heads_q=1, heads_kv=1)
        bench_dense.kernel(small, bench_dense.make_inputs(small))()  # compile on small inputs
        self.run = bench_dense.kernel(case, bench_dense.make_inputs(case))

    def peakmem_forward_long(self):
        self.run()


_COMPILE_SCRIPT = """
from fastattn.bench import dense as bench_dense
case = bench_dense.Case({op!r}, dtype={dtype!r}, seq=64, heads_q=2, heads_kv=2, head_dim=32)
bench_dense.kernel(case, bench_dense.make_inputs(case, {backend!r}))()
"""


class TimeCompile:
    """First call of each kernel in a fresh interpreter with an empty NUMBA_CACHE_DIR.

    Each sample includes interpreter start-up and ``import fastattn``:
    subtract ``time_import``.  ``backward`` compiles the forward too (its
    inputs come from the forward).
    """

    backend = "cpu"
    number = 1
    repeat = (1, 3, 120.0)
    rounds = 1
    warmup_time = 0
    timeout = 600

    def setup(self):
        if self.backend == "cuda":
            usable, reason = bench_core.cuda_status()
            if not usable:
                raise NotImplementedError(reason)

    def _fresh(self, code):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            subprocess.run([sys.executable, "-c", code], env=env, check=True)

    def _compile(self, op, dtype="float32"):
        self._fresh(_COMPILE_SCRIPT.format(op=op, dtype=dtype, backend=self.backend))

    def time_import(self):
        self._fresh("import fastattn, fastattn.cpu, fastattn.cuda")

    def time_compile_forward(self):
        self._compile("forward")

    def time_compile_forward_float16(self):
        self._compile("forward", "float16")

    def time_compile_backward(self):
        self._compile("backward")


class TimeAttentionVarlen:
    """A packed batch of one 2048-token and fifteen 128-token causal sequences (H=8, D=64, f32):
    ``attention_varlen`` (packed) against the same sequences as separate ``attention`` calls and against
    padding every sequence to the longest (:mod:`fastattn.bench.masked`)."""

    params = (["packed", "separate", "padded"], ["forward", "forward+backward"])
    param_names = ["layout", "op"]
    timeout = 300

    def setup(self, layout, op):
        size = bench_masked.SIZES["full"]
        case = bench_masked.VarlenCase(op, size["long"], size["short"], size["short_count"], size["heads"],
                                       size["head_dim"])
        self.run = bench_masked.varlen_calls(case)[layout]
        self.run()

    def time_varlen(self, layout, op):
        self.run()


class TimeAttentionBias:
    """Dense float32 attention (B=1, H=8, N=2048, D=64) with a bias or mask of each broadcast kind, against
    the same call without (``none``); the backward returns dbias (:mod:`fastattn.bench.masked`)."""

    params = (list(bench_masked.BIAS_KINDS), ["forward", "forward causal", "backward causal"])
    param_names = ["extra", "op"]
    timeout = 300

    def setup(self, kind, op):
        size = bench_masked.SIZES["full"]
        case = bench_masked.BiasCase(op.split()[0], kind, op.endswith("causal"), size["seq"], size["heads"],
                                     size["head_dim"])
        self.run = bench_masked.bias_call(case)
        self.run()

    def time_bias(self, kind, op):
        self.run()


class TimeAttentionCUDA(bench_core.CUDAOnly, TimeAttention):
    """TimeAttention on device arrays (synchronised after every call); peer on the host."""


class TimeAttentionGQACUDA(bench_core.CUDAOnly, TimeAttentionGQA):
    """TimeAttentionGQA on device arrays."""


class TimeTensorCores(_Runs):
    """float16/bfloat16 forward and causal backward at B=4, H=16, N=4096, D=128 (the tensor-core issue's
    shape) on tensor cores (``mma``) or the SIMT kernels (``fastattn.config.cuda_mma``); CUDA only."""

    backend = "cuda"
    params = (["float16", "bfloat16"], ["mma", "simt"])
    param_names = ["dtype", "kernels"]

    def setup(self, dtype, kernels):
        import fastattn

        usable, reason = bench_core.cuda_status()
        if not usable:
            raise NotImplementedError(reason)
        self._before = fastattn.config.cuda_mma
        fastattn.config.cuda_mma = kernels == "mma"
        shape = dict(dtype=dtype, seq=4096, heads_q=16, heads_kv=16, batch=4, head_dim=128)
        self._prepare({"forward": bench_dense.Case("forward", **shape),
                       "backward": bench_dense.Case("backward", causal=True, **shape)})

    def teardown(self, dtype, kernels):
        import fastattn

        fastattn.config.cuda_mma = self._before

    def time_forward(self, dtype, kernels):
        self._time("forward")

    def time_backward_causal(self, dtype, kernels):
        self._time("backward")


class TimeTileProducts(_Runs):
    """float32 forward and causal backward, B=1, H=8, N=2048, D=64, with the tile products on fastattn's
    micro-kernels or on BLAS (``fastattn.config.cpu_gemm``; "simd" without AVX-512 spills registers)."""

    params = (["simd", "blas"],)
    param_names = ["products"]

    def setup(self, products):
        import fastattn

        self._before = fastattn.config.cpu_gemm
        fastattn.config.cpu_gemm = products
        self._prepare({"forward": bench_dense.Case("forward", dtype="float32", seq=2048),
                       "backward": bench_dense.Case("backward", dtype="float32", seq=2048, causal=True)})

    def teardown(self, products):
        import fastattn

        fastattn.config.cpu_gemm = self._before

    def time_forward(self, products):
        self._time("forward")

    def time_backward_causal(self, products):
        self._time("backward")


class TimeCompileCUDA(TimeCompile):
    """First launch of each CUDA kernel in a fresh process (numba.cuda does not cache them)."""

    backend = "cuda"


class TimeMergeAttentionStates:
    """merge_attention_states of N partial states [B=1, H=32, S=2048, D=128] vs the same in NumPy float32."""

    params = ([2, 8],)
    param_names = ["parts"]

    def setup(self, parts):
        import numpy as np

        rng = np.random.default_rng(0)
        self.outs = rng.standard_normal((parts, 1, 32, 2048, 128), np.float32)
        self.lses = rng.standard_normal((parts, 1, 32, 2048), np.float32)
        import fastattn

        self.merge = lambda: fastattn.merge_attention_states(self.outs, self.lses)
        self.merge()

    def time_merge(self, parts):
        self.merge()

    def time_numpy_peer(self, parts):
        import numpy as np

        top = self.lses.max(axis=0)
        w = np.exp(self.lses - top)
        total = w.sum(axis=0)
        (w[..., None] * self.outs).sum(axis=0) / total[..., None], top + np.log(total)

    def peakmem_merge(self, parts):
        self.merge()
