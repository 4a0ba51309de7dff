"""``python -m fastattn info | bench``: what this machine runs, and how fast.

``info`` prints versions, numba's threading layer and thread count, the CUDA
devices numba sees, the kernel cache directory and the CPU.  ``bench`` times the
named cases of :mod:`fastattn._bench` (the ones asv measures too) against this
machine's sgemm rate and a plain-NumPy peer.
"""
import argparse
import sys


def _info(args):
    from ._info import format_info, machine_info

    print(format_info(machine_info()))
    return 0


def _bench(args):
    from . import _bench

    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    backends = ("cpu", "cuda") if args.backend == "all" else (args.backend,)
    _bench.run(size, backends, json_path=args.json)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fastattn", description="fastattn: what this machine runs, and how fast.")
    commands = parser.add_subparsers(dest="command", metavar="{info,bench}")
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
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
