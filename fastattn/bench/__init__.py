"""``python -m fastattn bench``: named benchmark cases, their peers, and the command that times them.

One module per family of cases, each with its peers (plain NumPy, and
PyTorch where it is installed) beside them; :mod:`~fastattn.bench.core` holds
what they share (timers, machine probes, printing) and imports none of them.
``asv_benches/`` imports the same cases.

- :mod:`~fastattn.bench.dense`: dense attention, the sgemm reference and the sequence sweep;
- :mod:`~fastattn.bench.masked`: packed variable-length batches, biases and masks;
- :mod:`~fastattn.bench.paged`: paged decode, prefill, backward and cache writes;
- :mod:`~fastattn.bench.projection`: the fused projections and the layer;
- :mod:`~fastattn.bench.rotary`: rotary embeddings, alone and fused;
- :mod:`~fastattn.bench.torch_peers`: PyTorch side by side (``--peers``);
- :mod:`~fastattn.bench.gpu`: the GPU section (a real GPU only);
- :mod:`~fastattn.bench.scaleout`: ``fastattn.dask`` on a local cluster.
"""
import functools
import json
import sys

import fastattn

from .core import cuda_status, say, sgemm_gflops, tile_gemm_gflops


def run(size="full", backends=("cpu", "cuda"), json_path=None, stream=None, peers=False):
    """Measure sgemm, the CPU tables, then the GPU section; print and return the CPU rows.

    ``peers=True`` adds the PyTorch section (:mod:`fastattn.bench.torch_peers`) after the
    CPU tables, kept under ``"torch"`` in the JSON report.

    The GPU section (:mod:`fastattn.bench.gpu`) runs only on a real GPU;
    otherwise a note says why it was skipped.  The JSON report holds it under
    ``"gpu"`` whenever the cuda backend was asked for.
    """
    from .. import _info
    from . import masked, paged, projection, rotary
    from .dense import SIZES, format_table, measure, sweep, table

    stream = sys.stdout if stream is None else stream

    settings = SIZES[size]
    threads = _info.threading()
    cpu = _info.cpu()
    say(stream, f"fastattn {fastattn.__version__} on {cpu['model']} ({cpu['cores']} cores), "
                 f"numba {threads['threads']} threads ({threads['threading_layer']} layer)", end="\n")
    for line in _info.blas():
        say(stream, f"BLAS: {line}", end="\n")
    # the tile GEMMs first: NumPy's BLAS threads spin for a while after a multithreaded sgemm
    say(stream, f"measuring the forward's tile products (256×512 by 64 on each numba thread, "
                 f"{_info.tile_products()})…")
    tile_gemm = tile_gemm_gflops()
    say(stream, f" {tile_gemm:.1f} GFLOP/s (the ceiling of the float32 forward)", end="\n")
    n = settings["sgemm"]
    say(stream, f"measuring sgemm (NumPy float32 matmul {n}×{n})…")
    sgemm = sgemm_gflops(n)
    say(stream, f" {sgemm:.1f} GFLOP/s", end="\n")

    cases = table(settings["seq"], settings["heads"], settings["head_dim"])
    rows, notes, warm, peer_ms = [], [], set(), {}
    gpu = None
    for backend in backends:
        if backend == "cuda":
            # a real GPU gets its own section (below); the CPU's NumPy peer means nothing beside it
            usable, reason = cuda_status()
            gpu = dict(skipped=reason) if not usable else None
            if not usable:
                notes.append(reason)
            continue
        say(stream, f"{backend} (compiling happens once per kernel and dtype; later runs load the cache):",
             end="\n")
        for case in cases:
            rows.append(measure(case, backend, settings, warm, peer_ms, sgemm, stream))

    if rows:
        say(stream, "", end="\n")
        say(stream, format_table(rows), end="\n")
        say(stream, f"% sgemm: of NumPy's {sgemm:.1f} GFLOP/s measured above (fastattn's own tile products "
                     f"can exceed it: {tile_gemm:.1f}); vs NumPy: time of "
                     "fastattn.reference.naive_attention (or the NumPy backward peer) / time of fastattn; "
                     "the peer computes float16/bfloat16 in float32 (converting in the timed call) and "
                     "repeats K/V to Hq heads for GQA (np.repeat)", end="\n")
    if any((r["pct_sgemm"] or 0) > 100 * max(sgemm, tile_gemm) / sgemm for r in rows):
        notes.append("a row beats the measured rate of its own tile products: the machine was probably busy "
                     "while they were measured; rerun on an idle machine")
    for note in notes:
        say(stream, note, end="\n")
    points = []
    if "cpu" in backends:
        say(stream, "", end="\n")
        torch_peer = None
        if peers:
            from . import torch_peers

            torch = torch_peers.torch_status()[0]
            torch_peer = None if torch is None else functools.partial(torch_peers.dense_peer, torch)
        points = sweep(size, stream, torch_peer)
    paged_rows, bandwidth, paged_ratios, projection_rows, masked_rows, rotary_rows = [], None, {}, [], {}, []
    if "cpu" in backends:
        say(stream, "", end="\n")
        masked_rows = masked.run(size, stream)
        say(stream, "", end="\n")
        paged_rows, bandwidth, paged_ratios = paged.run(size, stream, ["cpu"])
        say(stream, "", end="\n")
        projection_rows = projection.run(size, stream)
        say(stream, "", end="\n")
        rotary_rows = rotary.run(size, stream)
    torch_section = None
    if peers and "cpu" in backends:
        from . import torch_peers

        say(stream, "", end="\n")
        torch_section = torch_peers.run(size, stream)
    if "cuda" in backends and gpu is None:
        from . import gpu as gpu_section

        say(stream, "", end="\n")
        gpu = gpu_section.run(size, stream)
    if json_path:
        report = dict(size=size, settings=settings, sgemm_gflops=sgemm, tile_gemm_gflops=tile_gemm, rows=rows,
                      notes=notes,
                      read_bandwidth_gbs=bandwidth, paged_rows=paged_rows, paged_ratios=paged_ratios,
                      projection_rows=projection_rows, masked=masked_rows, rotary=rotary_rows, sweep=points,
                      machine=_info.machine_info())
        if "cuda" in backends:
            report["gpu"] = gpu
        if peers:
            report["torch"] = torch_section
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        say(stream, f"wrote {json_path}", end="\n")
    return rows
