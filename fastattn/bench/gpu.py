"""The GPU section of ``python -m fastattn bench --backend cuda``.

Three measurements on a real CUDA device (never the simulator, whose timings
mean nothing):

- the device's copy rate: a device-to-device copy of a large buffer timed
  with CUDA events, counted as bytes read plus bytes written per second;
- paged decode (float16 and fp8 e4m3 caches): the KV cache's bytes read per
  second, and that rate as a share of the copy rate;
- dense attention forward and backward in float32, float16 and bfloat16 at
  ``N`` = 1024, 4096 and 16384, ``D`` = 64 and 128, causal and not, in
  TFLOP/s (FLOPs as in :mod:`fastattn.bench.dense`), beside PyTorch's
  ``scaled_dot_product_attention`` on the same memory when PyTorch sees the
  GPU.

fastattn and its peer are timed in turn (fastattn, torch, fastattn, torch,
...) so that clocks and temperature treat both alike; each sample is a run of
back-to-back calls between two CUDA events, and a row reports the median
sample (the best is kept in the JSON too).  Every case has a small time
budget and the whole section a deadline, after which the remaining cases are
listed as skipped rather than run.
"""
import statistics
import time
from dataclasses import asdict

import numpy as np

import fastattn
from .core import align, numpy_dtype, say, to_device
from .dense import DTYPES, Case, kernel
from .paged import PagedCase
from .paged import kernel as paged_kernel

#: The grids and time budgets of the section (``budget_s`` is the whole section's deadline).
SIZES = {
    "full": dict(seqs=(1024, 4096, 16384), head_dims=(64, 128), dtypes=DTYPES, ops=("forward", "backward"),
                 decode=((8, 4096), (32, 4096), (8, 16384), (32, 16384)), repeats=5, case_budget_s=1.0,
                 budget_s=120.0, copy_mib=1024, tensor_cores=((4, 16, 4096, 128),)),
    "quick": dict(seqs=(1024, 4096), head_dims=(128,), dtypes=DTYPES, ops=("forward", "backward"),
                  decode=((8, 4096), (32, 16384)), repeats=3, case_budget_s=0.5, budget_s=60.0, copy_mib=512,
                  tensor_cores=((4, 16, 4096, 128),)),
    "tiny": dict(seqs=(256,), head_dims=(64,), dtypes=("float16",), ops=("forward", "backward"),
                 decode=((2, 256),), repeats=2, case_budget_s=0.2, budget_s=20.0, copy_mib=64,
                 tensor_cores=((1, 2, 256, 64),)),
}
#: ``B * H * N`` of every dense case: each call has work enough to fill the GPU.
TOKENS = 65536
#: Paged decode layout (a Llama-style GQA head grouping, vLLM's block size).
DECODE = dict(heads_q=32, heads_kv=8, head_dim=128, block_size=16)
#: Cache dtypes of the decode rows.
DECODE_DTYPES = ("float16", "float8_e4m3fn")


# --- the cases -------------------------------------------------------------------------

def dense_shape(seq, tokens=None):
    """(batch, heads) for sequence length ``seq``: ``B * H * seq == tokens`` (:data:`TOKENS`), at most 16 heads."""
    tokens = TOKENS if tokens is None else tokens
    heads = min(16, max(1, tokens // seq))
    return max(1, tokens // (seq * heads)), heads


def dense_cases(size="full"):
    """The dense cases in run order: every short sequence before any long one.

    The deadline cuts the end of the list, so a slow kernel loses its
    longest rows first and keeps the whole grid of short ones.
    """
    s = SIZES[size]
    cases = []
    for seq in s["seqs"]:
        batch, heads = dense_shape(seq)
        for dtype in s["dtypes"]:
            for head_dim in s["head_dims"]:
                for causal in (False, True):
                    cases += [Case(op, dtype=dtype, seq=seq, causal=causal, heads_q=heads, heads_kv=heads,
                                   batch=batch, head_dim=head_dim) for op in s["ops"]]
    return cases


def tensor_core_cases(size="full"):
    """The tensor-core table's cases: the forward at each ``(B, H, N, D)`` of the size, float16 and
    bfloat16, without and with a causal mask."""
    return [Case("forward", dtype=dtype, seq=n, causal=causal, heads_q=h, heads_kv=h, batch=b, head_dim=d)
            for b, h, n, d in SIZES[size].get("tensor_cores", ()) for dtype in ("float16", "bfloat16")
            for causal in (False, True)]


def decode_cases(size="full"):
    """The paged decode cases in run order (float16 then fp8 for each batch and context)."""
    return [PagedCase("decode", dtype, batch=batch, context=context, **DECODE)
            for batch, context in SIZES[size]["decode"] for dtype in DECODE_DTYPES]


# --- what may run ---------------------------------------------------------------------

def torch_status():
    """``(torch, "")`` when PyTorch can run on the GPU, else ``(None, why its columns are skipped)``."""
    try:
        import torch
    except ImportError as exc:
        return None, f"PyTorch columns skipped: torch is not installed ({exc})"
    except Exception as exc:  # a broken install must not stop the fastattn rows
        return None, f"PyTorch columns skipped: import torch failed ({type(exc).__name__}: {exc})"
    try:
        available = torch.cuda.is_available()
    except Exception as exc:
        return None, f"PyTorch columns skipped: torch.cuda.is_available() raised {type(exc).__name__}: {exc}"
    if not available:
        return None, (f"PyTorch columns skipped: torch {getattr(torch, '__version__', '?')} sees no GPU "
                      "(torch.cuda.is_available() is False: a CPU-only build, or no driver for it)")
    return torch, ""


def device_name():
    """``"NAME (compute capability X.Y)"`` of numba's current device."""
    from numba import cuda

    gpu = cuda.get_current_device()
    name = gpu.name.decode() if isinstance(gpu.name, bytes) else gpu.name
    return f"{name} (compute capability {'.'.join(map(str, gpu.compute_capability))})"


# --- timing ------------------------------------------------------------------------------

def event_timer(fn, calls=1):
    """Seconds per call of ``calls`` back-to-back calls of ``fn``, between two CUDA events.

    The events are recorded on the default stream, where fastattn, numba
    copies and (unless told otherwise) PyTorch all launch.
    """
    from numba import cuda

    start, end = cuda.event(), cuda.event()
    cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return cuda.event_elapsed_time(start, end) / 1e3 / calls


def calls_per_sample(seconds, target_s=0.01, most=50):
    """How many calls of ``seconds`` each make a sample of about ``target_s`` (1 to ``most``).

    Short kernels are timed in runs so that launch gaps and event resolution
    do not dominate; a call longer than the target is a sample of its own.
    """
    if seconds <= 0:
        return most
    return max(1, min(most, round(target_s / seconds)))


def in_turn(timers, repeats, budget_s, clock=time.perf_counter):
    """Samples of each timer, taken in turn (a, b, a, b, ...): a list of seconds per timer.

    Every timer is a zero-argument callable returning seconds.  Rounds go on
    until ``repeats`` are done or ``budget_s`` of the clock has passed; at
    least one round always runs.
    """
    samples = [[] for _ in timers]
    start = clock()
    for _ in range(repeats):
        for timer, got in zip(timers, samples):
            got.append(timer())
        if clock() - start >= budget_s:
            break
    return samples


def _timer(fn, seconds):
    calls = calls_per_sample(seconds)
    return lambda: event_timer(fn, calls)


def copy_bandwidth(mib=1024, repeats=10):
    """The device's copy rate in GB/s: bytes read plus bytes written per second.

    A device-to-device copy of a ``mib`` MiB buffer, the best of ``repeats``,
    each timed with CUDA events.
    """
    from numba import cuda

    src = cuda.device_array(mib * 2 ** 20, np.uint8)
    dst = cuda.device_array_like(src)

    def copy():
        dst.copy_to_device(src)
    copy()
    seconds = min(event_timer(copy) for _ in range(repeats))
    return copy_rate(src.nbytes, seconds)


def copy_rate(nbytes, seconds):
    """GB/s of a copy of ``nbytes``: it reads them and writes them."""
    return 2 * nbytes / seconds / 1e9


# --- inputs on the device ----------------------------------------------------------------

def device_random(shape, dtype, rng, chunk_bytes=16 * 2 ** 20):
    """A device array of standard-normal values in ``dtype``, shape ``shape``.

    One host chunk of random values (at most ``chunk_bytes``) is copied over
    and over along the first axis: drawing gigabytes of random numbers on
    the host would take longer than the benchmark, and a decode reads the
    bytes at the same speed whatever they hold.
    """
    from numba import cuda

    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    per = max(1, min(shape[0], chunk_bytes // max(1, row_bytes)))
    chunk = fastattn._dtypes.bits_view(rng.standard_normal((per, *shape[1:]), np.float32).astype(dtype))
    dev = cuda.device_array(shape, chunk.dtype)
    for start in range(0, shape[0], per):
        n = min(per, shape[0] - start)
        dev[start:start + n].copy_to_device(np.ascontiguousarray(chunk[:n]))
    return dev if chunk.dtype == dtype else dev.view(dtype)


def paged_inputs(case, seed=0):
    """Device caches, queries, a random block table and sequence lengths of a decode case."""
    from numba import cuda

    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    per_seq = -(-case.context // case.block_size)
    num_blocks = case.batch * per_seq
    shape = (num_blocks, case.block_size, case.heads_kv, case.head_dim)
    q_dtype = np.float32 if dtype.itemsize == 1 else dtype
    q = rng.standard_normal((case.batch, case.heads_q, case.seq_q, case.head_dim), np.float32).astype(q_dtype)
    table = rng.permutation(num_blocks).astype(np.int32).reshape(case.batch, per_seq)
    return {"q": to_device(q), "k_cache": device_random(shape, dtype, rng),
            "v_cache": device_random(shape, dtype, rng), "block_table": cuda.to_device(table),
            "seq_lens": cuda.to_device(np.full(case.batch, case.context, np.int32))}


def dense_inputs(case, torch=None, seed=0):
    """Device q, k, v and dout of a dense case (numba device arrays, as fastattn takes them).

    With ``torch`` the arrays are views of PyTorch tensors, which are under
    ``"torch"``: both libraries read the same memory.  PyTorch exports no
    bfloat16 through ``__cuda_array_interface__``, so bfloat16 goes across
    as int16 bits and is viewed back.
    """
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    qshape = (case.batch, case.heads_q, case.seq, case.head_dim)
    kvshape = (case.batch, case.heads_kv, case.seq, case.head_dim)
    host = {name: rng.standard_normal(shape, np.float32).astype(dtype)
            for name, shape in (("q", qshape), ("k", kvshape), ("v", kvshape), ("dout", qshape))}
    if torch is None:
        return {**{name: to_device(a) for name, a in host.items()}, "torch": None}
    tensors = {name: to_torch(torch, a, case.dtype) for name, a in host.items()}
    return {**{name: from_torch(torch, t, case.dtype) for name, t in tensors.items()}, "torch": tensors}


def to_torch(torch, a, dtype_name):
    """A PyTorch CUDA tensor of a host array (float16/bfloat16 copied as their bits)."""
    if a.dtype.itemsize == 2:
        bits = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).to("cuda")
        return bits.view(getattr(torch, dtype_name))
    return torch.from_numpy(np.ascontiguousarray(a)).to("cuda")


def from_torch(torch, t, dtype_name):
    """A numba device array over a tensor's memory, zero-copy, in fastattn's dtype."""
    from numba import cuda

    t = t.detach()
    if dtype_name == "bfloat16":
        return cuda.as_cuda_array(t.view(torch.int16)).view(numpy_dtype("bfloat16"))
    return cuda.as_cuda_array(t)


def torch_kernel(case, tensors, torch):
    """A zero-argument callable running PyTorch's ``scaled_dot_product_attention`` on a case.

    ``"backward"`` times ``torch.autograd.grad`` of one forward kept for the
    purpose (fastattn's backward likewise gets the forward's out and lse);
    ``"forward+backward"`` runs both each call.
    """
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v, dout, causal = tensors["q"], tensors["k"], tensors["v"], tensors["dout"], case.causal
    if case.op == "forward":
        def forward():
            with torch.no_grad():
                return sdpa(q, k, v, is_causal=causal)
        return forward
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    if case.op == "backward":
        out = sdpa(*leaves, is_causal=causal)
        return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(sdpa(*leaves, is_causal=causal), leaves, dout)
    return forward_backward


# --- the rows ----------------------------------------------------------------------------

def _seconds(samples):
    return statistics.median(samples), min(samples)


def dense_row(case, seconds, best, torch_seconds=None, torch_best=None, calls=None, error=None,
              torch_error=None, torch_diff=None):
    """One dense row: times, TFLOP/s, PyTorch's figures, the fastattn/torch throughput ratio and
    ``torch_diff``, the largest :func:`relative_diff` of the results from PyTorch's."""
    tflops = None if seconds is None else case.flops / seconds / 1e12
    torch_tflops = None if torch_seconds is None else case.flops / torch_seconds / 1e12
    return dict(name=case.label, op=case.op, causal=case.causal, dtype=case.dtype, shape=case.shape,
                case=asdict(case), flops=case.flops, seconds=seconds, best_seconds=best, tflops=tflops,
                torch_seconds=torch_seconds, torch_best_seconds=torch_best, torch_tflops=torch_tflops,
                ratio=None if tflops is None or torch_tflops is None else tflops / torch_tflops,
                calls=calls, error=error, torch_error=torch_error, torch_diff=torch_diff)


def paged_row(case, seconds, best, copy_gbs, calls=None, error=None):
    """One decode row: time, the KV cache's GB/s and its share of the device's copy rate."""
    gbs = None if seconds is None else case.kv_bytes / seconds / 1e9
    return dict(name=case.label, op=case.op, dtype=case.dtype, shape=case.shape, case=asdict(case),
                kv_bytes=case.kv_bytes, seconds=seconds, best_seconds=best, gb_s=gbs, copy_gb_s=copy_gbs,
                pct_copy=None if gbs is None or not copy_gbs else 100.0 * gbs / copy_gbs, calls=calls, error=error)


def _error(exc):
    return f"{type(exc).__name__}: {exc}"


def measure_decode(case, settings, copy_gbs, stream):
    """Time one decode case on the device; return its row."""
    say(stream, f"  {case.label} {case.dtype} {case.shape}:")
    try:
        x = paged_inputs(case)
        fn = paged_kernel(case, x)
        fn()  # compile (or load the cache) and warm up
        timer = _timer(fn, event_timer(fn))
        (samples,) = in_turn([timer], settings["repeats"], settings["case_budget_s"])
    except Exception as exc:
        say(stream, f" failed: {_error(exc)}", end="\n")
        return paged_row(case, None, None, copy_gbs, error=_error(exc))
    row = paged_row(case, *_seconds(samples), copy_gbs, calls=len(samples))
    share = "" if row["pct_copy"] is None else f" ({row['pct_copy']:.0f}% of copy)"
    say(stream, f" {row['seconds'] * 1e3:.3f} ms, {row['gb_s']:.0f} GB/s{share}", end="\n")
    return row


def relative_diff(ours, theirs):
    """``max|a - b| / max|b|`` over the pairs of results (device arrays, and PyTorch tensors or device
    arrays), in float64.

    A check at the benchmark's own sizes that fastattn computes what PyTorch
    does: float16 and bfloat16 results agree to a few units of their rounding.
    """
    if not isinstance(ours, (tuple, list)):
        ours, theirs = (ours,), (theirs,)
    worst = 0.0
    for a, b in zip(ours, theirs):
        a = np.asarray(a.copy_to_host()).astype(np.float64)
        if hasattr(b, "copy_to_host"):  # another fastattn result
            b = np.asarray(b.copy_to_host()).astype(np.float64)
        else:
            b = b.detach().float().cpu().numpy().astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny)))
    return worst


def measure_dense(case, x, settings, torch, stream):
    """Time one dense case, fastattn and PyTorch in turn, on shared inputs; return its row."""
    say(stream, f"  {case.label} {case.dtype} {case.shape}:")
    try:
        x = dict(x)
        if case.op == "backward":
            x["out"], x["lse"] = fastattn.attention(x["q"], x["k"], x["v"], causal=case.causal, return_lse=True)
        ours = kernel(case, x)
        ours()  # compile (or load the cache) and warm up
        timers = [_timer(ours, event_timer(ours))]
    except Exception as exc:
        say(stream, f" failed: {_error(exc)}", end="\n")
        return dense_row(case, None, None, error=_error(exc))
    torch_error = None
    if torch is not None:
        try:
            theirs = torch_kernel(case, x["torch"], torch)
            theirs()
            timers.append(_timer(theirs, event_timer(theirs)))
        except Exception as exc:
            torch_error = _error(exc)
    samples = in_turn(timers, settings["repeats"], settings["case_budget_s"])
    peer = _seconds(samples[1]) if len(samples) > 1 else (None, None)
    diff = None
    if len(timers) > 1:
        try:
            diff = relative_diff(ours(), theirs())
        except Exception as exc:
            torch_error = f"results not compared: {_error(exc)}"
    row = dense_row(case, *_seconds(samples[0]), *peer, calls=len(samples[0]), torch_error=torch_error,
                    torch_diff=diff)
    text = f" {row['seconds'] * 1e3:.3f} ms, {row['tflops']:.1f} TFLOP/s"
    if row["torch_tflops"] is not None:
        text += f"; torch {row['torch_seconds'] * 1e3:.3f} ms, {row['torch_tflops']:.1f} TFLOP/s"
    if diff is not None:
        text += f"; max diff from torch {diff:.2g}"
    if torch_error:
        text += f"; torch failed: {torch_error}"
    say(stream, text, end="\n")
    return row


def measure_tensor_cores(case, x, settings, torch, stream):
    """The forward of one case three ways, timed in turn: on tensor cores (``config.cuda_mma``), on the
    SIMT kernels, and PyTorch's SDPA; return its row."""
    say(stream, f"  tensor cores: {case.label} {case.dtype} {case.shape}:")
    run = kernel(case, x)

    def with_mma(on):
        def call():
            before, fastattn.config.cuda_mma = fastattn.config.cuda_mma, on
            try:
                return run()
            finally:
                fastattn.config.cuda_mma = before
        return call

    ours, simt = with_mma(True), with_mma(False)

    row = dict(name=case.op, dtype=case.dtype, shape=case.shape, causal=case.causal, error=None, torch_error=None,
               mma_seconds=None, simt_seconds=None, torch_seconds=None, mma_tflops=None, simt_tflops=None,
               torch_tflops=None, over_torch=None, over_simt=None, torch_diff=None, simt_diff=None)
    try:
        fns = [ours, simt]
        for fn in fns:
            fn()  # compile (or load the cache) and warm up
        if torch is not None:
            try:
                theirs = torch_kernel(case, x["torch"], torch)
                theirs()
                fns.append(theirs)
            except Exception as exc:
                row["torch_error"] = _error(exc)
        samples = in_turn([_timer(fn, event_timer(fn)) for fn in fns], settings["repeats"],
                          settings["case_budget_s"])
        for name, got in zip(("mma", "simt", "torch"), samples):
            row[f"{name}_seconds"] = _seconds(got)[0]
            row[f"{name}_tflops"] = case.flops / row[f"{name}_seconds"] / 1e12
        row["over_simt"] = row["mma_tflops"] / row["simt_tflops"]
        row["simt_diff"] = relative_diff(ours(), simt())
        if len(fns) > 2:
            row["over_torch"] = row["mma_tflops"] / row["torch_tflops"]
            row["torch_diff"] = relative_diff(ours(), theirs())
    except Exception as exc:
        row["error"] = _error(exc)
        say(stream, f" failed: {row['error']}", end="\n")
        return row
    say(stream, f" {row['mma_tflops']:.1f} TFLOP/s (SIMT {row['simt_tflops']:.1f}"
                + (f", torch {row['torch_tflops']:.1f})" if row["torch_tflops"] else ")"), end="\n")
    return row


# --- the tables -------------------------------------------------------------------------

def _cell(value, fmt):
    return "—" if value is None else format(value, fmt)


def _ms(seconds):
    return None if seconds is None else 1e3 * seconds


def format_dense(rows):
    """The dense rows as an aligned plain-text table (a failed row says so in its time column)."""
    head = ("op", "dtype", "shape (B×Hq×Hkv×N×D)", "time ms", "TFLOP/s", "torch ms", "torch TFLOP/s",
            "fastattn/torch", "diff")
    body = [(r["name"], r["dtype"], r["shape"], "failed" if r["error"] else _cell(_ms(r["seconds"]), ".3f"),
             _cell(r["tflops"], ".2f"), _cell(_ms(r["torch_seconds"]), ".3f"),
             _cell(r["torch_tflops"], ".2f"), _cell(r["ratio"], ".2f"), _cell(r.get("torch_diff"), ".1g"))
            for r in rows]
    return align(head, body, 3)


def format_tensor_cores(rows):
    """The tensor-core rows as an aligned plain-text table."""
    head = ("op", "dtype", "shape (B×Hq×Hkv×N×D)", "mma ms", "mma TFLOP/s", "SIMT TFLOP/s", "torch TFLOP/s",
            "mma/torch", "mma/SIMT", "diff torch", "diff SIMT")
    body = [(r["name"] + (" causal" if r["causal"] else ""), r["dtype"], r["shape"],
             "failed" if r["error"] else _cell(_ms(r.get("mma_seconds")), ".3f"), _cell(r.get("mma_tflops"), ".1f"),
             _cell(r.get("simt_tflops"), ".1f"), _cell(r.get("torch_tflops"), ".1f"),
             _cell(r.get("over_torch"), ".2f"), _cell(r.get("over_simt"), ".2f"), _cell(r.get("torch_diff"), ".1g"),
             _cell(r.get("simt_diff"), ".1g"))
            for r in rows]
    return align(head, body, 3)


def format_decode(rows):
    """The decode rows as an aligned plain-text table."""
    head = ("op", "cache dtype", "shape", "time ms", "KV GB/s", "% copy bw")
    body = [(r["name"], r["dtype"], r["shape"], "failed" if r["error"] else _cell(_ms(r["seconds"]), ".3f"),
             _cell(r["gb_s"], ".0f"), "—" if r["pct_copy"] is None else f"{r['pct_copy']:.0f}%") for r in rows]
    return align(head, body, 3)


# --- the section ------------------------------------------------------------------------

def run(size, stream):
    """Measure the copy rate, the decode rows and the dense grid; print them; return the section.

    The section is a dict: ``device``, ``torch`` (version or None),
    ``copy_bandwidth_gbs``, ``decode_rows``, ``dense_rows``, ``skipped``
    (labels of cases the deadline left out) and ``notes``.  Ctrl-C (or
    ``timeout -s INT``) ends the measuring early and keeps what was measured.
    """
    from numba import cuda

    settings = SIZES[size]
    deadline = time.perf_counter() + settings["budget_s"]
    torch, torch_note = torch_status()
    notes = [torch_note] if torch_note else []
    section = dict(size=size, settings=settings, device=device_name(), torch=torch and torch.__version__,
                   copy_bandwidth_gbs=None, decode_rows=[], tensor_core_rows=[], dense_rows=[], skipped=[],
                   notes=notes)
    say(stream, f"GPU: {section['device']}; "
                 + (f"torch {torch.__version__}" if torch else torch_note), end="\n")
    cases = ([("decode", c) for c in decode_cases(size)] + [("tensor cores", c) for c in tensor_core_cases(size)]
             + [("dense", c) for c in dense_cases(size)])
    done, interrupted = 0, False
    try:
        say(stream, f"measuring copy bandwidth (device-to-device, {settings['copy_mib']} MiB)…")
        try:
            section["copy_bandwidth_gbs"] = copy_gbs = copy_bandwidth(settings["copy_mib"])
            say(stream, f" {copy_gbs:.0f} GB/s (read + written)", end="\n")
        except Exception as exc:
            copy_gbs = None
            notes.append(f"copy bandwidth not measured ({_error(exc)}): no % copy bw column")
            say(stream, f" failed: {_error(exc)}", end="\n")
        inputs = (None, None)  # the last dense case's shape and inputs: causal and op share them
        for kind, case in cases:
            if time.perf_counter() > deadline:
                break
            if kind == "decode":
                section["decode_rows"].append(measure_decode(case, settings, copy_gbs, stream))
            elif kind == "tensor cores":
                inputs = (None, None)
                try:
                    x = dense_inputs(case, torch)
                except Exception as exc:
                    x = _error(exc)
                section["tensor_core_rows"].append(
                    dict(name=case.op, dtype=case.dtype, shape=case.shape, causal=case.causal, error=x)
                    if isinstance(x, str) else measure_tensor_cores(case, x, settings, torch, stream))
            else:
                key = (case.dtype, case.batch, case.heads_q, case.seq, case.head_dim)
                if inputs[0] != key:
                    inputs = (None, None)  # free the last shape's arrays before making the next
                    try:
                        inputs = (key, dense_inputs(case, torch))
                    except Exception as exc:
                        inputs = (key, _error(exc))
                if isinstance(inputs[1], str):
                    say(stream, f"  {case.label} {case.dtype} {case.shape}: no inputs: {inputs[1]}", end="\n")
                    section["dense_rows"].append(dense_row(case, None, None, error=inputs[1]))
                else:
                    section["dense_rows"].append(measure_dense(case, inputs[1], settings, torch, stream))
            done += 1
            cuda.synchronize()
    except KeyboardInterrupt:
        interrupted = True
        notes.append(f"interrupted after {done} of {len(cases)} cases; the rest are listed as skipped")
    skipped = [f"{case.label} {case.dtype} {case.shape}" for _, case in cases[done:]]
    if skipped and not interrupted:
        notes.append(f"{len(skipped)} of {len(cases)} cases skipped: the section's {settings['budget_s']:.0f} s "
                     "budget was spent")
    section["skipped"] = skipped
    if section["decode_rows"]:
        say(stream, "\n" + format_decode(section["decode_rows"]), end="\n")
        say(stream, "% copy bw: KV cache bytes read per second over the device-to-device copy rate "
                     "(bytes read + written per second) measured above", end="\n")
    if section["tensor_core_rows"]:
        say(stream, "\n" + format_tensor_cores(section["tensor_core_rows"]), end="\n")
        say(stream, "tensor cores: the float16/bfloat16 forward on mma.sync (fastattn.config.cuda_mma), on the "
                     "SIMT kernels (cuda_mma off) and PyTorch's SDPA, timed in turn; diff: max relative "
                     "difference of the outputs", end="\n")
    if section["dense_rows"]:
        say(stream, "\n" + format_dense(section["dense_rows"]), end="\n")
        say(stream, "time: median of samples timed in turn with PyTorch (CUDA events); "
                     "fastattn/torch: fastattn's TFLOP/s over PyTorch's scaled_dot_product_attention's; "
                     "diff: max|fastattn - torch| / max|torch| of the results", end="\n")
    for note in notes:
        say(stream, note, end="\n")
    return section
