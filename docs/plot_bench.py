"""Draw the benchmark plots of docs/benchmarks.md from ``python -m fastattn bench --json FILE``.

Usage::

    python -m fastattn bench --quick --json bench.json
    python docs/plot_bench.py bench.json --out docs/_static/bench

writes two PNG files into ``--out``:

- ``seq_sweep.png``: time of the float32 forward (non-causal and causal) against
  sequence length, fastattn, the plain-NumPy peer and PyTorch's SDPA (when
  the run had ``--peers``), log-log (the report's ``"sweep"`` points), with
  the time the same FLOPs take at the sgemm rate measured in the run as a
  dotted reference line (and, where the run's own tile products outran NumPy's
  sgemm, a dashed one at their rate, ``"tile_gemm_gflops"``);
- ``paged_bandwidth.png``: the KV bytes per second of each CPU paged decode
  case, with the machine's read bandwidth measured in the same run drawn as a
  line (``"paged_rows"`` and ``"read_bandwidth_gbs"``), and PyTorch's gather +
  SDPA on the same cache as a marker where the run measured it.

Needs matplotlib (the ``docs`` extra); nothing is measured here.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DECODE_OPS = ("decode", "dense decode")
SHORT_DTYPE = {"float8_e4m3fn": "fp8 e4m3", "float8_e5m2": "fp8 e5m2"}


def machine_line(report):
    """'CPU model, N threads (layer)' from the report's machine info, or '' when absent."""
    machine = report.get("machine") or {}
    cpu = (machine.get("cpu") or {}).get("model", "")
    threads = machine.get("threads")
    layer = machine.get("threading_layer")
    parts = [cpu] + ([f"{threads} threads ({layer})"] if threads else [])
    return ", ".join(p for p in parts if p)


def plot_sweep(report, path):
    """Time against sequence length per op, fastattn and NumPy, log-log."""
    points = report.get("sweep")
    if not points:
        raise SystemExit("plot_bench: the report has no 'sweep' points (run `python -m fastattn bench --json` "
                         "with the CPU backend)")
    ops = list(dict.fromkeys(p["op"] for p in points))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 4), sharey=True, squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = sorted((p for p in points if p["op"] == op), key=lambda p: p["seq"])
        seqs = [p["seq"] for p in mine]
        ax.loglog(seqs, [p["fastattn_s"] * 1e3 for p in mine], "o-", label="fastattn")
        ax.loglog(seqs, [p["numpy_s"] * 1e3 for p in mine], "s--", label="plain NumPy")
        if all("torch_s" in p for p in mine):
            ax.loglog(seqs, [p["torch_s"] * 1e3 for p in mine], "^-.", label="PyTorch SDPA")
        sgemm = report.get("sgemm_gflops")
        if sgemm and all("flops" in p for p in mine):
            ax.loglog(seqs, [p["flops"] / (sgemm * 1e9) * 1e3 for p in mine], ":", color="gray",
                      label=f"its FLOPs at NumPy's sgemm speed ({sgemm:.0f} GFLOP/s)")
        tiles = report.get("tile_gemm_gflops")
        if tiles and tiles > (sgemm or 0) and all("flops" in p for p in mine):
            ax.loglog(seqs, [p["flops"] / (tiles * 1e9) * 1e3 for p in mine], "--", color="gray", linewidth=1,
                      label=f"at the tile products' speed ({tiles:.0f} GFLOP/s)")
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.minorticks_off()
        ax.set_title(f"{op}, float32")
        ax.set_xlabel("sequence length N (B=1, H=8, D=64)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("time, ms (best of the run)")
    # the lower right of the last panel is empty (times grow with N): the legend goes there
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), loc="lower right", fontsize="small")
    fig.suptitle(f"Attention forward vs sequence length — {machine_line(report)}".rstrip(" —"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paged_bandwidth(report, path):
    """KV GB/s of each CPU decode case as bars, with the measured read bandwidth as a line."""
    rows = [r for r in report.get("paged_rows") or [] if r["op"] in DECODE_OPS and r.get("backend", "cpu") == "cpu"]
    bandwidth = report.get("read_bandwidth_gbs")
    if not rows or not bandwidth:
        raise SystemExit("plot_bench: the report has no CPU paged decode rows or no 'read_bandwidth_gbs'")
    labels = []
    for r in rows:
        batch_context = " ".join(r["shape"].split()[:2])
        labels.append(f"{r['name']}\n{SHORT_DTYPE.get(r['dtype'], r['dtype'])}\n{batch_context}")
    colors = ["tab:gray" if r["op"] == "dense decode" else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r["gb_s"] for r in rows], color=colors)
    torch_gbs = torch_decode_gbs(report, rows)
    if torch_gbs:
        xs, ys = zip(*torch_gbs)
        ax.plot(xs, ys, "k^", label="PyTorch: gather + SDPA, same cache")
    ax.axhline(bandwidth, color="tab:red", linestyle="--", label=f"read bandwidth {bandwidth:.1f} GB/s")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("KV cache read, GB/s")
    ax.set_title(f"Paged decode (blue) and dense decode (gray) — {machine_line(report)}".rstrip(" —"),
                 fontsize=10)
    ax.legend(loc="upper left")
    ax.set_ylim(0, 1.15 * max(bandwidth, *(r["gb_s"] for r in rows)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def torch_decode_gbs(report, rows):
    """[(bar index, GB/s)] of PyTorch on the decode rows it was timed on (``--peers``): the
    same KV bytes over PyTorch's time."""
    torch_rows = (report.get("torch") or {}).get("rows") or []
    out = []
    for i, r in enumerate(rows):
        for t in torch_rows:
            if t["case"] == r["case"] and t.get("torch_ms"):
                kv_bytes = r["gb_s"] * 1e9 * r["time_ms"] / 1e3
                out.append((i, kv_bytes / (t["torch_ms"] / 1e3) / 1e9))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="JSON written by `python -m fastattn bench --json FILE`")
    parser.add_argument("--out", default="docs/_static/bench", help="folder for the PNG files")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep(report, out / "seq_sweep.png")
    plot_paged_bandwidth(report, out / "paged_bandwidth.png")
    print(f"wrote {out / 'seq_sweep.png'} and {out / 'paged_bandwidth.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
