"""Where the time of a fastattn GPU call goes: its kernels, or the host around them.

Run on a machine with a CUDA GPU (``scripts/gpu_check.sh`` runs it):

    python scripts/gpu_profile.py [--tiny] [--only NAME]

For each case it prints the call's wall time (``calls`` back-to-back calls
and a synchronize, divided by ``calls``) and, when PyTorch can profile the
GPU, every kernel the call launched with its GPU time per call (CUPTI sees
numba's launches as well as PyTorch's: both use the device's primary
context).  Wall time well above the kernels' sum is host overhead:
validation, allocation, launch argument handling, synchronisation.

``--only NAME`` runs one case once after a warm-up call, for a kernel
profiler: ``ncu -k regex:forward --launch-skip 1 --launch-count 1 python
scripts/gpu_profile.py --only decode``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastattn.bench import gpu as bench_gpu  # noqa: E402
from fastattn.bench.dense import Case, kernel  # noqa: E402
from fastattn.bench.paged import PagedCase  # noqa: E402
from fastattn.bench.paged import kernel as paged_kernel  # noqa: E402


def cases(tiny):
    """(name, case) pairs: paged decode at two sizes, dense forward and backward."""
    if tiny:
        return [("decode", PagedCase("decode", "float16", batch=1, context=32, heads_q=4, heads_kv=2, head_dim=16,
                                     block_size=4)),
                ("forward-f16", Case("forward", "float16", seq=16, heads_q=2, heads_kv=2, batch=1, head_dim=16))]
    return [
        ("decode", PagedCase("decode", "float16", batch=8, context=4096)),
        ("decode-big", PagedCase("decode", "float16", batch=32, context=16384)),
        ("forward-f32", Case("forward", "float32", seq=4096, heads_q=16, heads_kv=16, batch=1, head_dim=64)),
        ("forward-f16", Case("forward", "float16", seq=4096, heads_q=16, heads_kv=16, batch=1, head_dim=128)),
        ("backward-f16", Case("backward", "float16", seq=4096, heads_q=16, heads_kv=16, batch=1, head_dim=128)),
    ]


def call_of(case):
    """A zero-argument callable running fastattn on the device inputs of ``case``."""
    import fastattn

    if isinstance(case, PagedCase):
        return paged_kernel(case, bench_gpu.paged_inputs(case))
    x = bench_gpu.dense_inputs(case)
    if case.op == "backward":
        x["out"], x["lse"] = fastattn.attention(x["q"], x["k"], x["v"], causal=case.causal, return_lse=True)
    return kernel(case, x)


def wall_seconds(fn, calls):
    from numba import cuda

    cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    cuda.synchronize()
    return (time.perf_counter() - start) / calls


def kernel_table(fn, calls):
    """[(kernel name, launches per call, GPU microseconds per call)] from PyTorch's profiler, or None."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    from numba import cuda

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:
            us = getattr(event, "cuda_time_total", 0.0)
        if us:
            rows.append((event.key, event.count / calls, us / calls))
    return sorted(rows, key=lambda row: -row[2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the simulator)")
    parser.add_argument("--only", help="run this case once after a warm-up call (for ncu)")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    for name, case in cases(args.tiny):
        if args.only and name != args.only:
            continue
        fn = call_of(case)
        fn()  # compile and warm up
        if args.only:
            fn()
            continue
        wall = wall_seconds(fn, args.calls)
        print(f"\n{name}: {case.label} {case.dtype} {case.shape}: wall {wall * 1e6:.0f} us per call", flush=True)
        table = kernel_table(fn, args.calls)
        if table is None:
            print("  (no kernel times: PyTorch cannot profile this GPU)")
            continue
        gpu = sum(us for _, _, us in table)
        print(f"  kernels {gpu:.0f} us per call ({100 * gpu / (wall * 1e6):.0f}% of the wall time)")
        for key, count, us in table[:8]:
            print(f"  {us:9.1f} us  x{count:4.1f}  {key[:110]}")


if __name__ == "__main__":
    main()
