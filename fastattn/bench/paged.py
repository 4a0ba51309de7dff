"""Named paged-attention benchmark cases shared by ``python -m fastattn bench`` and ``asv_benches/``.

Decode is memory-bound, so its figure of merit is the rate at which it reads
the KV cache, compared with this machine's read bandwidth measured in the same
run by :func:`read_bandwidth`.  Prefill and backward are compute-bound and
report GFLOP/s.  Every case also runs a plain-NumPy peer (gather the blocks
with fancy indexing, then dense NumPy attention) on the same inputs.
"""
from dataclasses import asdict, dataclass

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads

import fastattn
from fastattn.reference import naive_attention

from .core import align, as_peer, best_time, cuda_sync, interleaved, numpy_dtype, to_device
from .dense import naive_attention_backward

#: Sizes of the CLI's paged table (the decode shape of the issue is "full").
SIZES = {
    "full": dict(batch=8, context=4096, heads_q=32, heads_kv=8, head_dim=128, long_context=32768,
                 chunk=512, repeats=10, peer_repeats=3, budget_s=10.0, bandwidth_mib=1024),
    "quick": dict(batch=4, context=2048, heads_q=32, heads_kv=8, head_dim=128, long_context=16384,
                  chunk=256, repeats=5, peer_repeats=2, budget_s=2.0, bandwidth_mib=512),
    "tiny": dict(batch=2, context=256, heads_q=4, heads_kv=2, head_dim=32, long_context=1024,
                 chunk=32, repeats=2, peer_repeats=1, budget_s=0.5, bandwidth_mib=64),
}
BLOCK_SIZE = 16


@dataclass(frozen=True)
class PagedCase:
    """One paged benchmark: ``op`` over B sequences of ``context`` tokens in a paged cache."""

    op: str                  #: "decode", "dense decode", "prefill", "backward" or "write"
    dtype: str = "float16"   #: cache dtype ("float8_e4m3fn" for fp8 decode)
    batch: int = 8
    context: int = 4096
    heads_q: int = 32
    heads_kv: int = 8
    head_dim: int = 128
    seq_q: int = 1           #: queries per sequence (prefill/backward: the last seq_q tokens)
    block_size: int = BLOCK_SIZE
    threads: int = 0         #: numba threads (0: all)

    @property
    def label(self):
        fp8 = " fp8" if self.dtype.startswith("float8") else ""
        one = " (1 thread)" if self.threads == 1 else ""
        return f"{self.op}{fp8}{one}"

    @property
    def shape(self):
        return (f"B={self.batch} ctx={self.context} Sq={self.seq_q} H={self.heads_q}/{self.heads_kv} "
                f"D={self.head_dim}")

    @property
    def itemsize(self):
        return np.dtype(numpy_dtype(self.dtype)).itemsize

    @property
    def kv_bytes(self):
        """Bytes of K and V that the kernel must read (or, for writes, write)."""
        tokens = self.seq_q if self.op == "write" else self.context
        return 2 * self.batch * tokens * self.heads_kv * self.head_dim * self.itemsize

    @property
    def flops(self):
        """Two GEMMs per (query, key) pair; causal prefill counts the visible half; backward 2.5x."""
        pairs = self.batch * self.heads_q * self.seq_q * self.context
        if self.seq_q > 1:
            pairs -= self.batch * self.heads_q * self.seq_q * (self.seq_q - 1) // 2
        factor = 2.5 if self.op == "backward" else 0.0 if self.op == "write" else 1.0
        return 4.0 * pairs * self.head_dim * factor


def table(size="full"):
    """The cases of the CLI table, in print order."""
    s = SIZES[size]
    base = dict(batch=s["batch"], context=s["context"], heads_q=s["heads_q"], heads_kv=s["heads_kv"],
                head_dim=s["head_dim"])
    long = dict(base, batch=1, context=s["long_context"])
    return [
        PagedCase("decode", "float16", **base),
        PagedCase("dense decode", "float16", **base),
        PagedCase("decode", "float32", **base),
        PagedCase("dense decode", "float32", **base),
        PagedCase("decode", "float8_e4m3fn", **base),
        PagedCase("decode", "float16", **long),
        PagedCase("decode", "float16", threads=1, **long),
        PagedCase("prefill", "float16", seq_q=s["chunk"], **dict(base, batch=1)),
        PagedCase("backward", "float32", seq_q=s["chunk"] // 4, **dict(base, batch=2, context=s["context"] // 4)),
        PagedCase("write", "float16", seq_q=s["chunk"], **base),
    ]


# --- inputs and the timed callables ----------------------------------------------------

def make_inputs(case, seed=0, backend="cpu"):
    """Caches with a random block table, queries, and what each op needs.

    A dict of NumPy arrays; with ``backend="cuda"`` the arrays fastattn reads are
    device arrays and the NumPy copies are under ``"host"`` (for the peer).
    """
    x = _host_inputs(case, seed)
    if backend == "cuda":
        device = {name: to_device(a) for name, a in x.items()}
        if case.op == "backward":
            device["out"], device["lse"] = fastattn.paged_attention(*_paged_args(device), causal=True,
                                                                    return_lse=True)
        device["host"] = x
        return device
    x["host"] = x
    return x


def _host_inputs(case, seed):
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    per_seq = -(-case.context // case.block_size)
    num_blocks = case.batch * per_seq
    shape = (num_blocks, case.block_size, case.heads_kv, case.head_dim)
    x = {"block_table": rng.permutation(num_blocks).astype(np.int32).reshape(case.batch, per_seq),
         "seq_lens": np.full(case.batch, case.context, np.int32)}
    for name in ("k_cache", "v_cache"):
        x[name] = rng.standard_normal(shape, np.float32).astype(dtype)
    q_dtype = np.float32 if dtype.itemsize == 1 else dtype
    x["q"] = rng.standard_normal((case.batch, case.heads_q, case.seq_q, case.head_dim), np.float32).astype(q_dtype)
    if case.op == "dense decode":
        x["k"], x["v"] = (gather_dense(x[n], x["block_table"], case.context) for n in ("k_cache", "v_cache"))
    if case.op == "backward":
        x["out"], x["lse"] = fastattn.paged_attention(*_paged_args(x), causal=True, return_lse=True)
        x["dout"] = rng.standard_normal(x["q"].shape, np.float32).astype(dtype)
    if case.op == "write":
        tokens = case.batch * case.seq_q
        x["k"], x["v"] = (rng.standard_normal((tokens, case.heads_kv, case.head_dim), np.float32).astype(q_dtype)
                          for _ in range(2))
        x["slot_mapping"] = rng.permutation(num_blocks * case.block_size)[:tokens]
    return x


def gather_dense(cache, block_table, context):
    """[B, Hkv, context, D] keys or values gathered from a paged cache with fancy indexing."""
    b, per_seq = block_table.shape
    blocks = cache[block_table]                                   # [B, per_seq, bs, Hkv, D]
    dense = blocks.reshape(b, per_seq * cache.shape[1], *cache.shape[2:])[:, :context]
    return np.ascontiguousarray(dense.transpose(0, 2, 1, 3))


def _paged_args(x):
    return x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"]


def kernel(case, x):
    """A zero-argument callable that runs fastattn on the inputs of a case."""
    if case.op == "dense decode":
        return lambda: fastattn.attention(x["q"], x["k"], x["v"])
    if case.op == "decode" and case.dtype.startswith("float8"):
        return lambda: fastattn.paged_attention_fp8(*_paged_args(x), k_scale=0.5, v_scale=0.5)
    if case.op in ("decode", "prefill"):
        return lambda: fastattn.paged_attention(*_paged_args(x), causal=True)
    if case.op == "backward":
        return lambda: fastattn.paged_attention_backward(
            x["dout"], x["q"], x["k_cache"], x["v_cache"], x["out"], x["lse"], x["block_table"], x["seq_lens"],
            causal=True)
    scale = 0.5 if case.itemsize == 1 else 1.0
    return lambda: fastattn.write_kv_cache(x["k"], x["v"], x["k_cache"], x["v_cache"], x["slot_mapping"],
                                           k_scale=scale, v_scale=scale)


def peer(case, x):
    """The plain-NumPy peer: gather the blocks with fancy indexing, then dense attention (or assignment)."""
    x = x["host"]
    if case.op == "write":
        def write():
            bs = case.block_size
            slots = x["slot_mapping"]
            x["k_cache"][slots // bs, slots % bs] = x["k"]
            x["v_cache"][slots // bs, slots % bs] = x["v"]
        return write
    if case.op == "backward":
        def backward():
            k, v = (gather_dense(x[n], x["block_table"], case.context) for n in ("k_cache", "v_cache"))
            grads = naive_attention_backward(*as_peer(x["dout"], x["q"], k, v, x["out"]), causal=True)
            return [g.astype(x["q"].dtype, copy=False) for g in grads]
        return backward
    fp8 = case.itemsize == 1  # NumPy has no fp8 arithmetic: decode first

    def forward():
        k, v = (gather_dense(x[n], x["block_table"], case.context) for n in ("k_cache", "v_cache"))
        if fp8:
            k, v = k.astype(np.float32) * 0.5, v.astype(np.float32) * 0.5
        q, k, v = as_peer(x["q"], k, v)  # half formats in float32, the way a NumPy user computes them
        return naive_attention(q, k, v, causal=case.seq_q > 1).astype(x["q"].dtype, copy=False)
    return forward


# --- the machine's read bandwidth -------------------------------------------------------

@njit(parallel=True, cache=True, fastmath=True)
def _read(rows, tasks, streams):
    """Sum a [n, 16] float32 array: each task reads `streams` far-apart runs in lockstep."""
    per = rows.shape[0] // (tasks * streams)
    partial = np.zeros(tasks, np.float32)
    for task in prange(tasks):
        acc = np.zeros(16, np.float32)
        for i in range(per):
            for s in range(streams):
                row = (task * streams + s) * per + i
                for lane in range(16):
                    acc[lane] += rows[row, lane]
        partial[task] = acc.sum()
    return partial.sum()


def read_bandwidth(mib=1024, repeats=5):
    """This machine's read bandwidth in GB/s: the best of several ways to stream a large array.

    All numba threads read their own parts of a ``mib`` MiB array with a few
    independent streams each (several streams keep more reads in flight, as a
    kernel that gathers blocks does).
    """
    rows = np.ones((mib * 2 ** 20 // 64, 16), np.float32)
    best = 0.0
    for streams in (1, 2, 4, 8):
        _read(rows, get_num_threads(), streams)
        seconds = best_time(lambda: _read(rows, get_num_threads(), streams), repeats)
        best = max(best, rows.nbytes / seconds / 1e9)
    return best


# --- the table ------------------------------------------------------------------------

def measure(case, settings, bandwidth, stream, backend="cpu"):
    """Time one case and its NumPy peer; return its table row (a dict)."""
    stream.write(f"  {case.label} {backend} {case.dtype} {case.shape}:")
    stream.flush()
    x = make_inputs(case, backend=backend)
    timed = kernel(case, x)
    if backend == "cuda":
        def run():
            timed()
            cuda_sync()
    else:
        run = timed
    threads = get_num_threads()
    if case.threads:
        set_num_threads(case.threads)
    try:
        run()  # compile (or load the cache) and warm up
        seconds = best_time(run, settings["repeats"], settings["budget_s"])
    finally:
        set_num_threads(threads)
    peer_s = best_time(peer(case, x), settings["peer_repeats"], settings["budget_s"])
    stream.write(f" {seconds * 1e3:.2f} ms; numpy peer {peer_s * 1e3:.1f} ms\n")
    gbs = case.kv_bytes / seconds / 1e9
    return dict(name=case.label, op=case.op, backend=backend, dtype=case.dtype, shape=case.shape, case=asdict(case),
                time_ms=seconds * 1e3, gb_s=gbs, pct_bandwidth=100.0 * gbs / bandwidth,
                gflops=case.flops / seconds / 1e9 if case.flops else None,
                peer_ms=peer_s * 1e3, speedup=peer_s / seconds)


def format_table(rows):
    head = ("op", "backend", "cache dtype", "shape", "time ms", "KV GB/s", "% read bw", "GFLOP/s", "vs NumPy")
    body = [(r["name"], r["backend"], r["dtype"], r["shape"], f"{r['time_ms']:.2f}", f"{r['gb_s']:.1f}",
             f"{r['pct_bandwidth']:.0f}%", "—" if r["gflops"] is None else f"{r['gflops']:.1f}",
             f"{r['speedup']:.1f}×") for r in rows]
    return align(head, body, 4)


def _runner(case):
    """A callable that runs a case (with its thread count) on fresh inputs."""
    x = make_inputs(case)
    fn = kernel(case, x)

    def run():
        threads = get_num_threads()
        if case.threads:
            set_num_threads(case.threads)
        try:
            fn()
        finally:
            set_num_threads(threads)
    run()
    return run


def paired(case_a, case_b, repeats):
    """Best times of two cases measured in turn (a busy machine slows both alike)."""
    return interleaved([_runner(case_a), _runner(case_b)], repeats)


def share_of_bandwidth(case, mib, repeats):
    """The case's KV read rate as a share of the read-bandwidth probe, the two timed in turn.

    On a shared machine whose speed drifts over minutes, a probe measured
    once at the start and a case measured minutes later can disagree by 2×;
    timed in turn, both see the same machine.  Returns (share, probe GB/s).
    """
    rows = np.ones((mib * 2 ** 20 // 64, 16), np.float32)
    threads = get_num_threads()
    probes = [lambda streams=streams: _read(rows, threads, streams) for streams in (1, 2, 4)]
    for probe in probes:
        probe()
    times = interleaved([_runner(case), *probes], repeats)
    bandwidth = rows.nbytes / min(times[1:]) / 1e9
    return case.kv_bytes / times[0] / 1e9 / bandwidth, bandwidth


def summary(size):
    """The ratios that matter for paged decode, each from its own interleaved runs."""
    s = SIZES[size]
    by = {(c.op, c.dtype, c.batch, c.threads): c for c in table(size)}
    base_b = s["batch"]
    lines, ratios = [], {}
    for dtype in ("float16", "float32"):
        share, bandwidth = share_of_bandwidth(by[("decode", dtype, base_b, 0)], s["bandwidth_mib"], s["repeats"])
        ratios[f"bandwidth share {dtype}"] = share
        lines.append(f"decode ({dtype}) reads the cache at {100 * share:.0f}% of the read bandwidth "
                     f"({bandwidth:.1f} GB/s; the two timed in turn)")
    for dtype in ("float16", "float32"):
        paged, dense = paired(by[("decode", dtype, base_b, 0)], by[("dense decode", dtype, base_b, 0)],
                              s["repeats"])
        ratios[f"paged/dense {dtype}"] = paged / dense
        lines.append(f"paged / dense decode time ({dtype}, measured in turn): {paged / dense:.2f}")
    fp8, f16 = paired(by[("decode", "float8_e4m3fn", base_b, 0)], by[("decode", "float16", base_b, 0)],
                      s["repeats"])
    ratios["fp8/f16"] = fp8 / f16
    lines.append(f"fp8 / f16 decode time (measured in turn): {fp8 / f16:.2f}")
    one, full = paired(by[("decode", "float16", 1, 1)], by[("decode", "float16", 1, 0)], s["repeats"])
    ratios["split-kv speed-up"] = one / full
    lines.append(f"B=1 long-context decode, all threads vs one (split-KV, measured in turn): "
                 f"{one / full:.2f}x faster")
    return lines, ratios


def run(size, stream, backends=("cpu",)):
    """Measure the read bandwidth, then every paged case; print the table and return (rows, bandwidth, ratios).

    % read bw of CUDA rows is against the host's bandwidth too (a GPU's HBM
    bandwidth is not measured here): read their GB/s instead.
    """
    settings = SIZES[size]
    stream.write(f"measuring read bandwidth ({settings['bandwidth_mib']} MiB, all threads)…")
    stream.flush()
    bandwidth = read_bandwidth(settings["bandwidth_mib"])
    stream.write(f" {bandwidth:.1f} GB/s\n")
    rows = []
    for backend in backends:
        stream.write(f"paged attention ({backend}):\n")
        rows += [measure(case, settings, bandwidth, stream, backend) for case in table(size)
                 if backend == "cpu" or not case.threads]
    stream.write("\n" + format_table(rows) + "\n")
    stream.write(f"% read bw: KV bytes read per second over the {bandwidth:.1f} GB/s measured above; "
                 "vs NumPy: time of a fancy-indexing gather + plain NumPy attention (float16 and fp8 caches "
                 "converted to float32 in the timed call, K/V repeated to Hq heads) / time of fastattn; "
                 "dense decode: fastattn.attention on the gathered cache (dense [B, Hkv, ctx, D] keys; "
                 "each KV row read once per group of query heads, as in the paged kernel)\n")
    lines, ratios = summary(size) if "cpu" in backends else ([], {})
    for line in lines:
        stream.write(line + "\n")
    return rows, bandwidth, ratios
