"""Overhead of :func:`fastattn.dask.attention` (2-worker LocalCluster, threaded scheduler) against the single call.

Run ``python -m fastattn.bench.scaleout`` (defaults: B=1, H=8, S=32768, D=64,
causal, keys and queries in chunks of 4096).  Both sides use the same two
cores: the single call runs numba's threads in this process, the cluster runs
two single-threaded worker processes (``NUMBA_NUM_THREADS=1`` each).  The
ratio is wall time of ``compute()`` (graph, transfers, merges included) over
the single call's; the single call and the chunked ones are timed in turn.
The threaded scheduler runs the same chunks in this process.
"""
import argparse
import time

import numpy as np


def local_cluster(n_workers=2):
    """A loopback LocalCluster of single-threaded worker processes, and its client."""
    import dask
    from distributed import Client, LocalCluster

    # before the worker processes start: distributed imports numba early, so a later env is too late
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), "NUMBA_NUM_THREADS": "1"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    return cluster, Client(cluster)


def inputs(client, shape, chunk):
    """q, k, v made on the workers in chunks of ``chunk`` along the sequence (as a distributed
    array would be), and the same numbers as NumPy arrays for the single call."""
    import dask.array as da

    rng = da.random.default_rng(0)
    chunks = shape[:2] + (chunk,) + shape[3:]
    chunked = client.persist([rng.standard_normal(shape, dtype=np.float32, chunks=chunks) for _ in range(3)])
    return chunked, client.compute(chunked, sync=True)


def run(seq=32768, heads=8, head_dim=64, chunk=4096, causal=True, repeats=3, stream=print):
    """Time the single call and the key- and query-chunked Dask call; return a dict of results."""
    import dask.array as da

    import fastattn.dask

    cluster, client = local_cluster()
    try:
        chunked, (q, k, v) = inputs(client, (1, heads, seq, head_dim), chunk)
        out = fastattn.dask.attention(*chunked, causal=causal)
        local = fastattn.dask.attention(*(da.from_array(x, chunks=chunked[0].chunks) for x in (q, k, v)),
                                        causal=causal)
        single = fastattn.attention(q, k, v, causal=causal)  # compile / load the kernels
        out.compute()
        times, error = {"single": [], "cluster": [], "threads": []}, 0.0
        for _ in range(repeats):  # in turn, so that the machine's mood hits all three alike
            for name, call in (("single", lambda: fastattn.attention(q, k, v, causal=causal)),
                               ("cluster", out.compute),
                               ("threads", lambda: local.compute(scheduler="threads"))):
                t0 = time.perf_counter()
                got = call()
                times[name].append(time.perf_counter() - t0)
                if name != "single":
                    error = max(error, float(np.abs(got - single).max()))
        n_tasks = len(out.__dask_graph__())
    finally:
        client.close()
        cluster.close()
    best = {name: min(t) for name, t in times.items()}
    result = dict(seq=seq, heads=heads, head_dim=head_dim, chunk=chunk, causal=causal,
                  single_s=best["single"], dask_s=best["cluster"], threads_s=best["threads"],
                  ratio=best["cluster"] / best["single"], threads_ratio=best["threads"] / best["single"],
                  max_abs_diff=error, tasks=n_tasks)
    stream(f"B=1 H={heads} S={seq} D={head_dim} {'causal' if causal else 'full'}, chunks of {chunk} "
           f"({n_tasks} tasks): single call {best['single']:.2f} s; 2-worker LocalCluster "
           f"{best['cluster']:.2f} s (ratio {result['ratio']:.2f}); threaded scheduler "
           f"{best['threads']:.2f} s (ratio {result['threads_ratio']:.2f}); max |diff| {error:.1e}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="no causal mask")
    args = parser.parse_args(argv)
    run(seq=args.seq, chunk=args.chunk, causal=not args.full, repeats=args.repeats)


if __name__ == "__main__":
    main()
