"""``python -m fastattn info | bench | cuda-report``: what this machine runs, and how fast.

``info`` prints versions, numba's threading layer and thread count, the CUDA
devices numba sees, the kernel cache directory and the CPU.  ``bench`` times the
named cases of :mod:`fastattn.bench` (the ones asv measures too) against this
machine's sgemm rate and a plain-NumPy peer.  ``cuda-report`` compiles every
CUDA kernel for a compute capability, without a GPU, and prints what ptxas made
of each (:mod:`fastattn._cuda_report`).
"""
import argparse
import os
import sys


def _info(args):
    from ._info import format_info, machine_info

    print(format_info(machine_info()))
    return 0


def _bench(args):
    from . import bench

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    backends = ("cpu", "cuda") if args.backend == "all" else (args.backend,)
    bench.run(size, backends, json_path=args.json, peers=args.peers)
    return 0


def _cuda_report_command(args):
    import json

    from . import _cuda_report

    reason = _cuda_report.missing_toolchain()
    if reason:
        print(f"python -m fastattn cuda-report: {reason}", file=sys.stderr)
        return 1
    rows = _cuda_report.report(cc=args.cc, head_dims=args.head_dims, ptx_dir=args.ptx_dir, jobs=args.jobs)
    print(f"CUDA kernels compiled for sm_{args.cc[0]}{args.cc[1]} (static smem in bytes, occupancy theoretical)")
    print(_cuda_report.format_table(rows))
    for line in _cuda_report.summary(rows):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


def _precompile_command(args):
    from ._precompile import precompile

    precompile(args.ops, args.dtypes, jobs=args.jobs)
    return 0


def _names(choices):
    def parse(text):
        names = tuple(t for t in text.split(",") if t)
        bad = [n for n in names if n not in choices]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected names from {','.join(choices)} separated by commas, "
                                             f"got {text!r}")
        return names
    return parse


def _compute_capability(text):
    from ._cuda_report import parse_cc

    try:
        return parse_cc(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--cc: ")) from None


def _head_dims(text):
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, like 64,128, got {text!r}")
    return dims


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastattn", description="fastattn: what this machine runs, and how fast.")
    commands = parser.add_subparsers(dest="command", metavar="{info,bench,precompile,cuda-report}")
    commands.required = True
    info = commands.add_parser("info", help="versions, threads, CUDA devices, cache dir, CPU")
    info.set_defaults(func=_info)
    bench = commands.add_parser(
        "bench", help="time the kernels against sgemm and a NumPy peer",
        description="Time forward/backward kernels (B=1, H=8, N=2048, D=64; N=1024 with --quick). "
                    "Kernels compile on their first call (a few seconds each, cached afterwards).")
    bench.add_argument("--quick", action="store_true", help="N=1024 and fewer repeats (well under a minute once compiled)")
    bench.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test size
    bench.add_argument("--json", metavar="FILE", help="also write the rows and machine info as JSON")
    bench.add_argument("--backend", choices=("cpu", "cuda", "all"), default="all",
                       help="which kernels to time (default: all; CUDA needs a real GPU)")
    bench.add_argument("--peers", action="store_true",
                       help="add PyTorch side by side on the CPU (needs torch: pip install \"fastattn[compare]\")")
    bench.set_defaults(func=_bench)
    from ._precompile import DTYPES, OPS

    pre = commands.add_parser(
        "precompile", help="fill the compile cache with every CPU kernel (run once, e.g. in a Docker image)",
        description="Call every CPU operation on tiny inputs in each dtype, so that numba compiles and "
                    "caches its kernels now rather than on a first call later; prints the seconds of each.")
    pre.add_argument("--ops", type=_names(OPS), default=OPS, metavar="OP,OP",
                     help=f"operation groups (default: all of {','.join(OPS)})")
    pre.add_argument("--dtypes", type=_names(DTYPES), default=DTYPES, metavar="DTYPE,DTYPE",
                     help=f"input dtypes (default: all of {','.join(DTYPES)})")
    pre.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                     help="processes to compile in (default: one per core)")
    pre.set_defaults(func=_precompile_command)
    report = commands.add_parser(
        "cuda-report", help="registers, spills, occupancy and f64 count of every CUDA kernel (no GPU needed)",
        description="Compile every CUDA kernel variant with NVVM and ptxas for one compute capability "
                    "(no GPU needed) and print its registers, spilled bytes, stack frame, static shared "
                    "memory, theoretical occupancy and float64 and mma instruction counts. "
                    'Needs pip install "fastattn[cuda-check]" and the CUDA simulator off.')
    report.add_argument("--cc", type=_compute_capability, default=(9, 0), metavar="X.Y",
                        help="compute capability to compile for (default: 9.0)")
    report.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    report.add_argument("--ptx-dir", metavar="DIR", help="keep each kernel's PTX in DIR")
    report.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="processes that compile the kernels (default: one per core)")
    report.add_argument("--head-dims", type=_head_dims, metavar="D,D", default=None,
                        help="head-dimension buckets to compile, e.g. 64,128 (default: all)")
    report.set_defaults(func=_cuda_report_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
